"""A router driven as its block drives it, for the router tests."""
from vmoe.moe import RoutingSettings, build_router, compute_capacity, expert_choice_capacity
from vmoe.moe.settings import resolve_settings

ROUTING = set(RoutingSettings.field_names())


class Routed:
    """A router plus the routing settings a block would give it (resolved against the scheme's defaults):
    calling it computes the capacity of the group as the block does and routes x [G, S, D]."""

    def __init__(self, name, num_experts, dim=None, **kw):
        given = RoutingSettings(**{key: value for key, value in kw.items() if key in ROUTING})
        self.router = build_router(name, dim=dim or num_experts, num_experts=num_experts,
                                   **{key: value for key, value in kw.items() if key not in ROUTING})
        cls = type(self.router)
        self.settings = resolve_settings(given, name, cls.default_settings(num_experts), cls.settings_used)
        self.router.check_settings(self.settings)

    def capacity(self, group_size):
        factor = self.settings.factor(self.router.training)
        e = self.router.num_experts
        if self.router.experts_choose:
            return expert_choice_capacity(group_size, e, factor)
        return compute_capacity(group_size * self.settings.k, e, factor)

    def __call__(self, x):
        return self.router(x, self.settings, self.capacity(x.shape[-2]))

    def train(self, mode=True):
        self.router.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def __getattr__(self, name):
        return getattr(self.router, name)

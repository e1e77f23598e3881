"""The training step cell: one optimizer step, whose first graph compile uses the compile cache."""
import mindspore.nn as nn


class TrainStep(nn.TrainOneStepCell):
    """``nn.TrainOneStepCell`` whose first graph compile in a process goes through the persistent
    cache (:mod:`vehiclenet.model.compile_cache`) when it trains a network create_network built
    for CPU: a second run with the same settings starts training in about a second instead of
    compiling (about 15 s)."""

    def compile(self, *args, **kwargs):
        net = getattr(self.network, "backbone_network", None)
        if not getattr(net, "cached_compile", False):
            return super().compile(*args, **kwargs)
        from ..model.compile_cache import first_compile

        with first_compile(self, args):
            return super().compile(*args, **kwargs)

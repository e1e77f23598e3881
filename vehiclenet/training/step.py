"""The training step cell: one optimizer step, whose first graph compile uses the compile cache."""
from typing import Any

import mindspore.nn as nn


class TrainStep(nn.TrainOneStepCell):
    """``nn.TrainOneStepCell`` whose first graph compile in a process goes through the persistent
    cache (:mod:`vehiclenet.model.compile_cache`) when it trains a network create_network built
    for CPU: a later run with the same settings loads the graph instead of compiling it."""

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        """MindSpore's compile, through the cache when the trained network allows it."""
        # create_network marks the networks whose graphs the cache is tested for (CPU, no AMP);
        # any other network, or a loss cell without one, compiles as MindSpore does.
        net = getattr(self.network, "backbone_network", None)
        if not getattr(net, "cached_compile", False):
            return super().compile(*args, **kwargs)
        from ..model.compile_cache import first_compile

        with first_compile(self, args):
            return super().compile(*args, **kwargs)

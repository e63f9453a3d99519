"""EditLab's ComfyUI nodes: thin schema-style nodes over ``samplers/`` and ``guidance/``.

Imported only when ComfyUI calls the pack's entry point, so importing the pack stays cheap.
"""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from . import inversion, sdedit
from . import dual_cfg
from . import p2p
from . import subject
from . import dreambooth
from . import metrics
from . import gradient_guidance
from . import metric_sweep
from . import flow_edit, rf_inversion


def node_list() -> list[type[io.ComfyNode]]:
    return [*sdedit.NODES, *inversion.NODES, *dual_cfg.NODES, *p2p.NODES, *subject.NODES, *dreambooth.NODES, *metrics.NODES, *metric_sweep.NODES, *gradient_guidance.NODES, *flow_edit.NODES, *rf_inversion.NODES]


class EditLabExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return node_list()

"""What an offline policy (`comm-volume`) sees besides the selection scores."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from megatron_moe_ext.routing.topology import EPTopology


@dataclass
class OfflineContext:
    topology: EPTopology
    src_ep_rank: torch.Tensor                  # LongTensor[T], the EP rank each token starts on
    options: Dict[str, object] = field(default_factory=dict)  # the policy's OfflineOptions
    layer: Optional[int] = None                # MoE layer number (traces), for per-layer plans
    affinity: Optional[torch.Tensor] = None    # [T, E] cosine token-gate affinity, when known

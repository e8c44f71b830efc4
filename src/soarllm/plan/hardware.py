"""Hardware from the catalog, and this machine described by measurement."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Any

from soarllm.errors import InvalidRequestError


@dataclass(frozen=True)
class Efficiency:
    """What the roofline assumes a real engine achieves; ``soar plan --calibrate`` fits these."""

    compute_eff: float = 0.6  # fraction of peak FLOPS reached by the step's matmuls
    memory_eff: float = 0.8  # fraction of peak memory bandwidth reached by weight/KV reads
    comm_eff: float = 0.7  # fraction of interconnect bandwidth reached by all-reduce
    step_overhead_s: float = 0.001  # fixed cost of one engine step (scheduling, launches)
    seq_overhead_s: float = 0.0  # extra cost per sequence in a step (metadata, sampling)
    overlap: bool = True  # True: time = max(compute, memory); False: compute + memory

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class Hardware:
    id: str
    name: str
    memory_gib: float
    memory_bw_gbs: float
    tflops: dict[str, float]  # peak dense TFLOPS by compute dtype
    interconnect_gbs: float = 0.0
    interconnect_latency_us: float = 0.0
    max_tp: int = 1
    devices_per_node: int = 0  # devices one interconnect domain joins (0: max_tp)
    internode_gbs: float = 0.0  # per-device bandwidth to other nodes, one direction (0: none)
    internode_latency_us: float = 0.0
    internode: str = ""
    price_per_hour: float | None = None  # USD per device-hour
    vendor: str = ""
    interconnect: str = ""
    default_dtype: str = "bf16"
    efficiency: Efficiency = field(default_factory=Efficiency)
    memory_reserve_fraction: float = 0.1  # kept free for activations, workspace, fragmentation
    sources: dict[str, str] = field(default_factory=dict)

    def peak_flops(self, dtype: str) -> float:
        if dtype in self.tflops:
            return self.tflops[dtype] * 1e12
        if dtype == "int8" and "fp8" in self.tflops:
            return self.tflops["fp8"] * 1e12
        raise InvalidRequestError(
            f"{self.name} has no {dtype} compute figure in the catalog "
            f"(it lists {', '.join(sorted(self.tflops))})"
        )

    @property
    def node_size(self) -> int:
        return self.devices_per_node or self.max_tp

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * 2**30

    @property
    def usable_memory_bytes(self) -> float:
        return self.memory_bytes * (1 - self.memory_reserve_fraction)


def _read_catalog(path: str | None = None) -> dict[str, Any]:
    if path:
        with open(path) as f:
            return json.load(f)
    return json.loads(resources.files("soarllm.plan").joinpath("catalog.json").read_text())


def hardware_from_dict(entry: dict[str, Any], defaults: dict[str, Any] | None = None) -> Hardware:
    defaults = defaults or {}
    eff = {**defaults.get("efficiency", {}), **entry.get("efficiency", {})}
    keys = {f for f in Hardware.__dataclass_fields__} - {"efficiency"}
    values = {k: v for k, v in entry.items() if k in keys}
    values.setdefault("memory_reserve_fraction", defaults.get("memory_reserve_fraction", 0.1))
    return Hardware(**values, efficiency=Efficiency(**eff))


def load_catalog(path: str | None = None) -> list[Hardware]:
    data = _read_catalog(path)
    return [hardware_from_dict(e, data.get("defaults")) for e in data["hardware"]]


def select(catalog: list[Hardware], ids: list[str] | None) -> list[Hardware]:
    if not ids:
        return catalog
    by_id = {h.id: h for h in catalog}
    unknown = [i for i in ids if i not in by_id]
    if unknown:
        raise InvalidRequestError(
            f"unknown hardware {unknown}; the catalog has {', '.join(by_id)} and 'this'"
        )
    return [by_id[i] for i in ids]


def with_efficiency(hw: Hardware, efficiency: Efficiency) -> Hardware:
    return replace(hw, efficiency=efficiency)

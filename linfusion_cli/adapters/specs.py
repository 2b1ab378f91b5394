"""The adapters of a plan as typed, frozen specs: what loading, the memory estimate, the dry run
and the record need, checked when the plan is made. `to_dict` is the record's JSON."""

from __future__ import annotations

from dataclasses import dataclass, field

from .lora import LoraSpec

CONTROLNET_KINDS = ("controlnet", "tile_controlnet")  # AdapterSpecs fields, in the pipeline's order


@dataclass(frozen=True)
class ControlNetSpec:
    """A ControlNet or tile ControlNet: its weights, scale, control image (the structure one's;
    the tile one's is each stage's input), and the config the planner counts and the loader uses."""

    source: str
    scale: float = 1.0
    format: str | None = None  # single file: safetensors | pickle; a folder of pickled .bin: pickle
    image: str | None = None
    image_size: tuple[int, int] | None = None
    config: dict = field(default_factory=dict, compare=False, repr=False)  # derived once, at plan time

    def to_dict(self) -> dict:
        return ({"source": self.source} | ({"format": self.format} if self.format else {})
                | ({"image": self.image, "image_size": list(self.image_size)} if self.image else {})
                | {"scale": self.scale})


@dataclass(frozen=True)
class IpAdapterSpec:
    """An IP-Adapter: the adapter (a file, or a hub repo's subfolder and file), its image encoder,
    the reference image and scale."""

    source: str
    image: str
    image_size: tuple[int, int]
    scale: float = 1.0
    encoder: str | None = None
    encoder_format: str | None = None  # "pickle": a .bin encoder, read only with --allow-pickle
    subfolder: str | None = None  # hub ids: where h94/IP-Adapter keeps this family's file
    weight_name: str | None = None
    hub: bool = False  # a hub id: subfolder and weight_name are recorded (None included)

    def to_dict(self) -> dict:
        where = {"subfolder": self.subfolder, "weight_name": self.weight_name} if self.hub else {}
        return ({"source": self.source} | where | ({"encoder": self.encoder} if self.encoder else {})
                | ({"encoder_format": self.encoder_format} if self.encoder_format else {})
                | {"image": self.image, "image_size": list(self.image_size), "scale": self.scale})


@dataclass(frozen=True)
class AdapterSpecs:
    """Every adapter a plan loads; empty (false) without any."""

    loras: tuple[LoraSpec, ...] = ()
    controlnet: ControlNetSpec | None = None
    tile_controlnet: ControlNetSpec | None = None
    ip_adapter: IpAdapterSpec | None = None

    def __bool__(self) -> bool:
        return bool(self.loras) or any(getattr(self, k) is not None for k in (*CONTROLNET_KINDS, "ip_adapter"))

    def controlnets(self, kinds) -> list[ControlNetSpec]:
        """The specs of the ControlNets named (a stage's `controlnets`), in that order."""
        return [getattr(self, kind) for kind in kinds]

    def to_dict(self) -> dict:
        """The record's JSON: only the kinds asked for."""
        out: dict = {"loras": [s.to_dict() for s in self.loras]} if self.loras else {}
        for kind in (*CONTROLNET_KINDS, "ip_adapter"):
            if getattr(self, kind) is not None:
                out[kind] = getattr(self, kind).to_dict()
        return out

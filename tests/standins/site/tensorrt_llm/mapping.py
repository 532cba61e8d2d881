"""Stand-in for tensorrt_llm.mapping.Mapping: the keyword arguments kiln passes, nothing else."""


class Mapping:
    def __init__(self, world_size: int = 1, rank: int = 0, tp_size: int = 1, pp_size: int = 1, **kwargs):
        if kwargs:
            raise TypeError(f"Mapping got unexpected arguments {sorted(kwargs)}")
        if world_size != tp_size * pp_size:
            raise ValueError(f"world_size {world_size} != tp_size {tp_size} * pp_size {pp_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.world_size, self.rank, self.tp_size, self.pp_size = world_size, rank, tp_size, pp_size

    def to_dict(self) -> dict:
        return {"world_size": self.world_size, "tp_size": self.tp_size, "pp_size": self.pp_size}

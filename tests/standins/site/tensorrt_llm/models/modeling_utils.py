"""Stand-in for tensorrt_llm.models.modeling_utils.QuantConfig: its fields, settable as there."""


class QuantConfig:
    _FIELDS = ("quant_algo", "kv_cache_quant_algo", "group_size", "smoothquant_val", "clamp_val", "use_meta_recipe",
               "has_zero_point", "pre_quant_scale", "exclude_modules")

    def __init__(self, **fields):
        for name in self._FIELDS:
            setattr(self, name, None)
        self.group_size, self.has_zero_point, self.pre_quant_scale = 128, False, False
        for name, value in fields.items():
            setattr(self, name, value)

    def __setattr__(self, name, value):
        if name not in self._FIELDS:
            raise AttributeError(f"QuantConfig has no field {name!r}")
        object.__setattr__(self, name, value)

    def to_dict(self) -> dict:
        return {name: getattr(getattr(self, name), "value", getattr(self, name)) for name in self._FIELDS}

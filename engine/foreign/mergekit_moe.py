"""mergekit-moe configs as recipes: `stack_experts` over the base, then `init_gates` with mergekit's gate mode."""
from __future__ import annotations

from typing import Any

from recipekit.engine.errors import Path_
from recipekit.engine.foreign.translation import ConfigTranslator, Translation

_MOE_KEYS = ("base_model", "gate_mode", "experts", "shared_experts", "experts_per_token", "dtype", "architecture")
_EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
# gate_mode -> init_gates settings reproducing mergekit's meaning
_GATE_MODES = {
    "hidden": {"mode": "hidden", "hidden_state": "residual", "token": "last"},
    "hidden_last": {"mode": "hidden", "hidden_state": "residual", "token": "last"},
    "hidden_avg": {"mode": "hidden", "hidden_state": "residual", "token": "mean"},
    "cheap_embed": {"mode": "cheap_embed", "token": "mean"},
    "random": {"mode": "random"},
    "uniform_random": {"mode": "uniform_random"},
}
_ARCHITECTURES = {"mixtral": "mixtral", "qwen": "qwen2_moe", "qwen3": "qwen3_moe"}


class MergekitMoe(ConfigTranslator):
    """mergekit-moe's config (`base_model`, `gate_mode`, `experts`, ...) as a stack_experts + init_gates recipe."""

    format = "mergekit-moe"

    def translate(self) -> Translation:
        data = self.data
        self._unknown(data, _MOE_KEYS, (), "a mergekit-moe config")
        base = self._model(data.get("base_model"), ("base_model",), "base")
        experts = self._experts(data.get("experts"), ("experts",))
        shared = data.get("shared_experts")
        stack: dict[str, Any] = {"id": "moe", "op": "stack_experts", "base": base}
        self.paths[("steps", 0)] = ()
        self.paths[("steps", 0, "base")] = ("base_model",)
        architecture = data.get("architecture")
        if architecture is not None:
            if architecture in _ARCHITECTURES:
                stack["layout"] = _ARCHITECTURES[architecture]
                self.paths[("steps", 0, "layout")] = ("architecture",)
            else:
                self._refuse(("architecture",), f"architecture {architecture!r} is not supported (recipekit writes "
                                                 f"{', '.join(_ARCHITECTURES)})")
        if "experts_per_token" in data:
            stack["experts_per_token"] = data["experts_per_token"]
            self.paths[("steps", 0, "experts_per_token")] = ("experts_per_token",)
        stack["experts"] = experts
        self.paths[("steps", 0, "experts")] = ("experts",)
        if shared is not None:
            shared_list = self._experts(shared, ("shared_experts",))
            if isinstance(shared, list) and len(shared) > 1:
                self._refuse(("shared_experts", 1), "at most one shared expert is supported")
            elif shared_list:
                stack["shared_expert"] = shared_list[0]
                self.paths[("steps", 0, "shared_expert")] = ("shared_experts", 0)
        # mergekit-moe's default gate_mode is hidden
        mode = data.get("gate_mode", "hidden")
        gates: dict[str, Any] = {"op": "init_gates", "model": "moe"}
        for key in ((), ("mode",), ("hidden_state",), ("token",)):  # at the top when left at mergekit's default
            self.paths[("steps", 1) + key] = ("gate_mode",)
        if mode in _GATE_MODES:
            gates.update(_GATE_MODES[mode])
        else:
            self._refuse(("gate_mode",), f"gate_mode {mode!r} is not supported (supported: "
                                         f"{', '.join(_GATE_MODES)})")
        output: dict[str, Any] = {"tokenizer": "base"}
        if data.get("dtype") is not None:
            output["dtype"] = data["dtype"]
            self.paths[("output", "dtype")] = ("dtype",)
        return self.finish({"recipe": 1, "models": dict(self.models), "steps": [stack, gates], "output": output})

    def _experts(self, value: Any, path: Path_) -> list[dict]:
        if not isinstance(value, list) or not value:
            self._refuse(path, "expected a list of experts, each with a source_model")
            return []
        experts = []
        for k, entry in enumerate(value):
            where = path + (k,)
            if not isinstance(entry, dict):
                self._refuse(where, "an expert is a mapping with source_model and optional prompts")
                continue
            self._unknown(entry, _EXPERT_KEYS, where, "a mergekit-moe expert")
            name = self._model(entry.get("source_model"), where + ("source_model",), None)
            expert: dict[str, Any] = {"model": name}
            target = ("steps", 0, "experts", k) if path == ("experts",) else ("steps", 0, "shared_expert")
            self.paths[target + ("model",)] = where + ("source_model",)
            for ours, theirs in (("positive", "positive_prompts"), ("negative", "negative_prompts"),
                                 ("noise_scale", "noise_scale"), ("residual_scale", "residual_scale")):
                if entry.get(theirs) is not None:
                    expert[ours] = entry[theirs]
                    self.paths[target + (ours,)] = where + (theirs,)
            experts.append(expert)
        return experts

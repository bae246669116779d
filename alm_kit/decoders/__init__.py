"""Built-in decoders."""

from alm_kit.registry.hookspecs import hookimpl


@hookimpl
def register_decoders(register):
    register(
        "causal_lm",
        "alm_kit.decoders.causal_lm:CausalLMDecoder",
        description="any transformers causal LM (SmolLM2, Qwen3, ...): hub id, preset, local folder, GGUF or a config",
    )

"""Built-in fusion modules (several encoder streams -> one; ``chain`` runs several in sequence)."""

from alm_kit.registry.hookspecs import hookimpl


@hookimpl
def register_fusions(register):
    register("concat", "alm_kit.fusion.concat:ConcatFusion",
             description="pool every temporal stream to one length, concatenate features; pooled vectors joined")
    register("downsample", "alm_kit.fusion.downsample:DownsampleFusion",
             description="ALARM adapters: per-stream conv adapters to target_rate tokens/s, then concatenated or summed")
    register("cross_attention", "alm_kit.fusion.cross_attention:CrossAttentionFusion",
             description="ALARM-CA: the query stream cross-attends to each other stream in turn; query length kept")
    register("perceiver", "alm_kit.fusion.perceiver:PerceiverFusion",
             description="ALARM-P: extra streams compressed to K Perceiver latents, framed and put before the main stream")
    register("chain", "alm_kit.fusion.chain:ChainFusion",
             description="fusions in sequence: inner steps hand streams on (downsample adapters), the last joins")

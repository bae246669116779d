"""The plugin hooks of alm-kit.

Every component kind has one hook. A hook receives a ``register`` callable and
calls it once per component the plugin provides::

    from alm_kit import hookimpl

    @hookimpl
    def register_encoders(register):
        register("logmel_cnn", "my_pkg.encoder:LogMelCNN", description="small CNN")

``register(name, component, *, description="")`` takes the component class or a
``"module:Class"`` string; strings are imported only when the component is
built, so listing plugins stays fast. Built-in components use exactly these hooks.

``register`` in every hook:

* ``name`` (str): what recipes write (``name: logmel_cnn``); non-empty, unique per kind.
* ``component`` (type | str): the class, or ``"package.module:Class"`` (imported when a
  model is built or a recipe validated). Anything else makes the hook fail.
* ``description`` (str, keyword): the line ``alm-kit plugins`` shows; default: the first
  line of the class's docstring (a string target has none).

A hook registers all of its components or, when it raises, none; the failure is
recorded with the plugin's name and distribution (``alm-kit plugins`` shows it, and a
recipe that names a missing component is told which plugins failed). The hook module
is found through the entry-point group ``alm_kit`` (docs/plugins.md); keep it light:
``alm_kit.hookimpl`` does not import torch.
"""

from __future__ import annotations

import pluggy

PROJECT = "alm_kit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_encoders(register):
    """Register audio encoders (waveform -> framewise features, optional pooled vector).

    Each class subclasses :class:`alm_kit.interfaces.Encoder` and is built as ``cls(config)``.

    Args:
        register: ``register(name, component, *, description="")``, see the module docstring.

    Example:
        >>> from alm_kit.registry import build_registry
        >>> class MyPlugin:  # usually the module your entry point names, e.g. my_pkg/plugin.py
        ...     @hookimpl
        ...     def register_encoders(register):
        ...         register("hop_stats", "my_pkg.encoders:HopStats", description="mean and RMS per 10 ms")
        >>> registry = build_registry(plugins=[MyPlugin], entry_points=False)
        >>> entry = registry.get("encoder", "hop_stats")
        >>> entry.target_path, entry.description
        ('my_pkg.encoders:HopStats', 'mean and RMS per 10 ms')
    """


@hookspec
def register_fusions(register):
    """Register fusion modules (several encoder streams -> one stream).

    Each class subclasses :class:`alm_kit.interfaces.Fusion` and is built as
    ``cls(config, streams)``.

    Args:
        register: ``register(name, component, *, description="")``, see the module docstring.

    Example:
        >>> from alm_kit.registry import build_registry
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def register_fusions(register):
        ...         register("sequential", "my_pkg.fusions:Sequential")
        >>> "sequential" in build_registry(plugins=[MyPlugin], entry_points=False).names("fusion")
        True
    """


@hookspec
def register_projectors(register):
    """Register projectors (audio stream [+ prompt embeddings] -> decoder-width audio tokens).

    Each class subclasses :class:`alm_kit.interfaces.Projector` and is built as
    ``cls(config, stream, output_dim)``.

    Args:
        register: ``register(name, component, *, description="")``, see the module docstring.

    Example:
        Two projectors from one hook, one of them given as the class:

        >>> from alm_kit.interfaces import AudioTokens, Projector
        >>> from alm_kit.registry import build_registry
        >>> class Identity(Projector):
        ...     '''Frames as tokens (the stream must already have the decoder's width).'''
        ...     def forward(self, audio, prompt=None):
        ...         return AudioTokens(audio.frames, audio.mask)
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def register_projectors(register):
        ...         register("swiglu", "my_pkg.projectors:SwiGLUProjector", description="SwiGLU MLP")
        ...         register("identity", Identity)
        >>> registry = build_registry(plugins=[MyPlugin], entry_points=False)
        >>> registry.load("projector", "identity") is Identity, registry.get("projector", "identity").description
        (True, "Frames as tokens (the stream must already have the decoder's width).")
    """


@hookspec
def register_decoders(register):
    """Register decoders (causal language models with their tokenizer).

    Each class subclasses :class:`alm_kit.interfaces.Decoder` and is built as ``cls(config)``.

    Args:
        register: ``register(name, component, *, description="")``, see the module docstring.

    Example:
        >>> from alm_kit.registry import build_registry
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def register_decoders(register):
        ...         register("my_lm", "my_pkg.decoders:MyLM", description="my causal LM")
        >>> build_registry(plugins=[MyPlugin], entry_points=False).names("decoder")
        ['causal_lm', 'my_lm']
    """


@hookspec
def register_layouts(register):
    """Register layouts (how audio tokens and text are arranged in the decoder input).

    Each class subclasses :class:`alm_kit.interfaces.Layout` and is built as
    ``cls(config, decoder)``.

    Args:
        register: ``register(name, component, *, description="")``, see the module docstring.

    Example:
        A target that is not ``"package.module:Class"`` makes the hook fail; nothing of it is
        registered and the failure names the plugin:

        >>> from alm_kit.registry import build_registry
        >>> class MyPlugin:
        ...     @hookimpl
        ...     def register_layouts(register):
        ...         register("audio_first", "my_pkg.layouts:AudioFirst")
        ...         register("broken", "my_pkg.layouts.AudioFirst")  # '.' where ':' belongs
        >>> registry = build_registry(plugins=[MyPlugin], entry_points=False)
        >>> "audio_first" in registry.names("layout"), registry.failures[0].error
        (False, "register_layouts: TypeError: layout 'broken': 'my_pkg.layouts.AudioFirst' is not a 'package.module:Class' string")
    """

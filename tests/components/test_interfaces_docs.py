"""The plugin API's reference: the examples in alm_kit/interfaces.py and alm_kit/registry/hookspecs.py run."""

from __future__ import annotations

import doctest
import inspect

import pytest

import alm_kit.interfaces
import alm_kit.registry.hookspecs

#: what a plugin implements: every one needs Args/Returns (where it returns something) and an Example
PLUGIN_METHODS = {
    alm_kit.interfaces.Encoder: ["forward"],
    alm_kit.interfaces.Fusion: ["__init__", "forward", "forward_streams"],
    alm_kit.interfaces.Projector: ["__init__", "forward"],
    alm_kit.interfaces.Decoder: ["embed", "forward", "logits", "language_model", "save_tokenizer"],
    alm_kit.interfaces.Layout: ["__init__", "tokenize", "end_token_id", "assemble"],
    alm_kit.interfaces.Component: ["__init__", "has_pretrained_weights", "sources", "standalone_params"],
}


def run_examples(module) -> doctest.TestResults:
    """Every example of ``module`` in name order, sharing names like one interactive session
    (a method's example uses the object its class's example built)."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    shared: dict = {}
    for test in sorted(doctest.DocTestFinder().find(module), key=lambda t: t.name):
        shared.update({k: v for k, v in vars(module).items() if k not in shared})
        test.globs = shared
        runner.run(test, clear_globs=False)
    return runner.summarize(verbose=False)


@pytest.mark.parametrize("module", [alm_kit.interfaces, alm_kit.registry.hookspecs])
def test_examples_run(module):
    result = run_examples(module)
    assert result.attempted > 0 and result.failed == 0


@pytest.mark.parametrize("cls, names", PLUGIN_METHODS.items(), ids=lambda x: getattr(x, "__name__", ""))
def test_every_plugin_method_documents_args_returns_and_an_example(cls, names):
    for name in names:
        member = inspect.getattr_static(cls, name)
        doc = inspect.getdoc(getattr(member, "fget", member)) or ""
        returns = name not in ("__init__", "save_tokenizer")
        assert "Args:" in doc or name in ("language_model", "end_token_id", "has_pretrained_weights",
                                                      "standalone_params"), name
        assert ("Returns:" in doc) == returns or name == "__init__", name
        assert "Example:" in doc or name == "__init__", name
    assert "Example:" in (cls.__doc__ or "")


def test_every_hook_documents_args_and_an_example():
    from alm_kit.registry.manager import KINDS

    for hook in KINDS.values():
        doc = inspect.getdoc(getattr(alm_kit.registry.hookspecs, hook))
        assert "Args:" in doc and "Example:" in doc, hook

"""A small byte-level BPE tokenizer built in code, for offline tests and the demo.

Real recipes use the decoder's own tokenizer from the hub; nothing can be
downloaded here, so tests and the demo use this one. It is trained on a fixed
built-in corpus, so every build gives the same vocabulary, and comes in two flavours
with the same vocabulary:

* ``builtin:tiny`` -- SmolLM2-Instruct style: a plain ChatML chat template, EOS = BOS = PAD =
  ``<|endoftext|>`` (id 0, Mellow's separator);
* ``builtin:tiny-qwen3`` -- Qwen3 style: a chat template modelled on Qwen3's (reasoning of an
  assistant turn rendered inside ``<think>``, ``enable_thinking=False`` pre-fills an empty
  thinking block), EOS ``<|im_end|>``, PAD ``<|endoftext|>``, no BOS, and ``<think>`` /
  ``</think>`` as ordinary added tokens (not special), so decoding with
  ``skip_special_tokens`` keeps them, as with the real Qwen3 tokenizer.

Checkpoints save the tokenizer next to the weights.
"""

from __future__ import annotations

import json
from functools import lru_cache

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<audio>", "<think>", "</think>"]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: modelled on Qwen3's template (single-turn parts; no tools): the reasoning of the last assistant
#: turn is re-rendered as "<think>\n...\n</think>\n\n", and with enable_thinking=false the
#: generation prompt ends in an empty thinking block
QWEN3_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' or (message['role'] == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{%- set content = message['content'] %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.last and reasoning %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)
#: flavour -> (chat template, tokens that stay ordinary added tokens)
FLAVOURS = {"tiny": (CHAT_TEMPLATE, ()), "tiny-qwen3": (QWEN3_CHAT_TEMPLATE, ("<think>", "</think>"))}

_WORDS = """
the a an and or of to in on at for with from by is are was were be been it this that these those
there here what which who whom whose when where why how yes no not none neither both either all any
one two three four five six seven eight nine ten zero first second third last next before after then
sound sounds audio clip clips tone tones beep beeps noise burst pitch higher lower same equal louder
quieter loud quiet medium silent silence rising falling steady warbling sweep more less fewer count
number comes come together change changes does do did can could would should will shall may might
hear heard hearing listen listening spoken word words speech speaker voice music musical instrument
red green blue yellow house water dog cat bird car engine rain wind door bell siren clapping
describe explain answer question options option choice choices correct wrong true false think thought
because so therefore first the second clip has have had more beeps than fewer the higher tone
i you he she we they me my your our their its is in the audio sounds like it seems
time duration short long fast slow begin begins start starts end ends during while until
""".split()


def _corpus() -> list[str]:
    lines = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 12)]
    lines += [w.capitalize() + "." for w in _WORDS]
    lines += [f"{i} {i * 7 % 100} {i}.{i % 10}" for i in range(100)]
    lines += ["a) b) c) d) ? ! , . : ; ' \" ( ) [ ] - + = / * % < > _ #"]
    return lines * 4


@lru_cache(maxsize=4)
def _build_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok.to_str()


def _tokenizer_json(vocab_size: int, plain: tuple[str, ...]) -> str:
    data = json.loads(_build_json(vocab_size))
    for token in data["added_tokens"]:
        if token["content"] in plain:
            token["special"] = False
    return json.dumps(data)


def build_tiny_tokenizer(vocab_size: int = 768, flavour: str = "tiny"):
    """A ``PreTrainedTokenizerFast``; ``flavour`` is ``tiny`` (SmolLM2 style) or ``tiny-qwen3``."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown built-in tokenizer 'builtin:{flavour}'; available: "
                         + ", ".join(f"builtin:{name}" for name in FLAVOURS))
    template, plain = FLAVOURS[flavour]
    qwen3 = flavour == "tiny-qwen3"
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, plain)),
        eos_token="<|im_end|>" if qwen3 else "<|endoftext|>",
        bos_token=None if qwen3 else "<|endoftext|>",
        unk_token=None,
        pad_token="<|endoftext|>",
        additional_special_tokens=[t for t in SPECIAL_TOKENS[1:] if t not in plain],
        chat_template=template,
    )

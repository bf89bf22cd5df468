"""A character-level tokenizer built locally, for tiny models, tests and the CPU demo.

Nothing is downloaded: the vocabulary is the given alphabet plus a few special tokens,
and the result is a regular `PreTrainedTokenizerFast` saved with a chat template, so
the rest of the pipeline treats it exactly like a real model's tokenizer.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

SPECIALS = ["<pad>", "<eos>", "<user>", "<assistant>", "<unk>"]
DEFAULT_ALPHABET = string.digits + string.ascii_letters + string.punctuation + " \n"
CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}<user>{{ m['content'] }}"
    "{% elif m['role'] == 'assistant' %}<assistant>{{ m['content'] }}<eos>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def build_char_tokenizer(out_dir: str | Path | None = None, alphabet: str = DEFAULT_ALPHABET):
    """Return a PreTrainedTokenizerFast over single characters; save it to out_dir if given."""
    from transformers import PreTrainedTokenizerFast

    chars = list(dict.fromkeys(alphabet))
    vocab = {tok: i for i, tok in enumerate(SPECIALS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", chat_template=CHAT_TEMPLATE
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast

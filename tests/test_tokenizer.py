"""booth.tokenizer against transformers' CLIPTokenizer, plus vocabulary facts and long-prompt chunking."""

import random
import unicodedata

import pytest
import torch
from helpers import clip_vocab, transformers_tokenizer

from booth.tokenizer import _DEFAULT_BPE, BOS, EOS, Tokenizer, get_tokenizer

EMPTY = [BOS] + [EOS] * 76
CAT = 2368  # "cat</w>": one token per word

HAND_PICKED = [
    "",
    "   ",
    "a photo of an astronaut riding a horse on mars",
    "A Photo Of A CAT, Trending On ArtStation, 8K, HDR!!!",
    "masterpiece, best quality, (ultra-detailed:1.2), [blue|green], {cyberpunk}, <lora:foo:0.8>",
    "don't it's we're they've I'm you'll she'd DON'T IT'S WE'RE THEY'VE I'M YOU'LL SHE'D",
    "rock'n'roll o'clock '' 's 'S ''s '' 're ' ll ’s l’été",
    "café naïve Ångström straße ÉCOLE e\u0301 \u212b \u0041\u030a ﬁne",
    "東京タワー 富士山の夜景 москва Ёлка Москва ελληνικά ΟΔΟΣ İstanbul ıI",
    "مرحبا بالعالم שלום עולם हिन्दी भाषा 한국어 ภาษาไทย",
    "1920s 3.14159 1,000,000 007 ½ ² Ⅻ ٣٤ ๕ ①②",
    "😀😃 👨‍👩‍👧‍👦 👍🏽👍🏿 🏳️‍🌈 ❤️ 🇫🇷 ☃ ✨sparkles✨",
    "tom &amp; jerry &lt;3 &#39;quoted&#39; &quot;hi&quot; &nbsp; &amp;amp;",
    "tabs\tand\nnewlines\r\n  multiple   spaces \u3000ideographic\xa0nbsp\u2003em",
    "x\u200by\ufeffz \x00\x1c\x1f\x7f \u180e \u2060",
    # marks and compositions newer than tokenizers' Unicode 9.0 NFC tables: never reordered or composed
    "a\u0301\u1df6\u0316 \u0c15\u0c4d\u0c3c \U00011935\U00011930 e\u0301\u1dfa\u0316x",
    "<|endoftext|> a <|startoftext|>b<|endoftext|>'s <|EndOfText|>'s <|STARTOFTEXT|>!! <|endoftext|\u0338",
    "...!!!?!--—–“quoted” ‘single’ «guillemets» #hashtag @user http://example.com/a_b?c=d&e=f",
    "snake_case CamelCase ALLCAPS mIxEd",
    "pneumonoultramicroscopicsilicovolcanoconiosis " + "a" * 300 + " " + "supercalifragilistic" * 15,
]
PIECES = [
    "a", "photo", "of", "portrait", "cat", "dog", "astronaut", "riding", "horse", "masterpiece", "8k", "4K",
    "HDR", "by", "greg", "rutkowski",
    "best quality", "ultra-detailed", "(red:1.2)", "[blue|green]", "{cyberpunk}", "don't", "it's", "we're",
    "they've", "I'm", "you'll", "she'd", "IT'S", "Don'T", "We'Re", "rock'n'roll", "café", "naïve", "Ångström",
    "straße", "東京タワー", "富士山", "москва", "Ёлка", "مرحبا", "שלום", "हिन्दी", "한국어", "ΟΔΟΣ", "İstanbul",
    "1920s", "3.14159", "1,000,000", "½", "²", "Ⅻ", "٣٤", "😀", "👨‍👩‍👧‍👦", "👍🏽", "🏳️‍🌈", "&amp;", "&lt;3",
    "&#39;", "...", "!!!", "?!", "—", "“quoted”", "’s", "#tag", "snake_case", "e\u0301", "<|endoftext|>",
]  # fmt: skip
SEPARATORS = [" ", " ", ", ", "  ", "\t", "\n", "", " \u3000", "\xa0", "'", "-"]
CASES = [str, str, str.upper, str.title, str.swapcase]


def generated_prompts(n: int = 300) -> list[str]:
    """Deterministic pseudo-prompts mixing words, unicode, punctuation, case and whitespace."""
    rng = random.Random(0)
    prompts = []
    for _ in range(n):
        words = [rng.choice(CASES)(rng.choice(PIECES)) for _ in range(rng.randint(1, 14))]
        prompts.append("".join(w + rng.choice(SEPARATORS) for w in words))
    return prompts


def code_point_prompts(stride: int = 7, length: int = 25) -> list[str]:
    """Every `stride`-th character known to this Python's Unicode database, in strings of `length`."""
    chars = [chr(c) for c in range(0, 0x110000, stride) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    return ["".join(chars[i : i + length]) for i in range(0, len(chars), length)]


@pytest.fixture(scope="module")
def vocab() -> dict[str, int]:
    return clip_vocab()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    pytest.importorskip("transformers")
    return transformers_tokenizer(tmp_path_factory.mktemp("clip_tokenizer"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_tokenizer()


def test_vocabulary_facts(tok, vocab, hf):
    assert tok.vocab_size == len(vocab) == len(hf) == 49408
    assert tok._ids == vocab  # byte order, </w> variants, merges, then the two special tokens
    assert len(tok._ranks) == 48894
    assert (BOS, EOS) == (49406, 49407) == (hf.bos_token_id, hf.eos_token_id)
    assert hf.pad_token_id == EOS
    assert get_tokenizer() is tok
    assert Tokenizer(_DEFAULT_BPE).encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


@pytest.mark.parametrize("source", ["hand_picked", "generated", "code_points"])
def test_encode_matches_transformers(tok, hf, source):
    prompts = {
        "hand_picked": HAND_PICKED,
        "generated": generated_prompts(),
        "code_points": code_point_prompts(),
    }
    prompts = prompts[source]
    expected = hf(prompts, add_special_tokens=False, verbose=False).input_ids
    mismatches = [(p, e, tok.encode(p)) for p, e in zip(prompts, expected) if tok.encode(p) != e]
    assert not mismatches, mismatches[:3]


def test_single_chunk_matches_transformers(tok, hf):
    prompts = HAND_PICKED + generated_prompts()
    short = [p for p in prompts if len(tok.encode(p)) <= 75]
    assert len(short) > 250
    expected = hf(short, padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(tok(short), expected.input_ids)
    assert [tok.chunks(p) for p in short] == [[row] for row in expected.input_ids.tolist()]


def test_decode(tok, hf):
    for prompt in HAND_PICKED[:12]:
        ids = tok.encode(prompt)
        assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(tok.chunks("A photo of a CAT!")[0]) == "a photo of a cat !"


def test_chunk_windows(tok, hf):
    assert tok.chunks("") == [EMPTY]
    assert tok.chunks("cat " * 75) == [[BOS] + [CAT] * 75 + [EOS]]
    assert tok.chunks("cat " * 76) == [[BOS] + [CAT] * 75 + [EOS], [BOS, CAT] + [EOS] * 75]
    chunks = tok.chunks("cat " * 200)
    assert [len(c) for c in chunks] == [77, 77, 77]
    assert chunks[:2] == [[BOS] + [CAT] * 75 + [EOS]] * 2
    assert chunks[2] == [BOS] + [CAT] * 50 + [EOS] * 26
    # A long mixed prompt: the windows concatenate back to the full encoding.
    prompt = " ".join(generated_prompts(40))
    ids = tok.encode(prompt)
    chunks = tok.chunks(prompt)
    assert len(chunks) == -(-len(ids) // 75) > 1
    assert [i for c in chunks for i in c[1:76]][: len(ids)] == ids
    assert tok.chunks("cat " * 10, chunk_len=4)[-1] == [BOS, CAT, CAT, EOS, EOS, EOS]


def test_break_and_min_chunks(tok):
    a, b = tok.chunks("a red cat")[0], tok.chunks("a blue dog")[0]
    assert tok.chunks("a red cat BREAK a blue dog") == [a, b]
    assert tok.chunks("a red cat,BREAK\na blue dog") == [tok.chunks("a red cat,")[0], b]
    assert tok.chunks("a red cat BREAK") == [a]  # a trailing BREAK opens no chunk
    assert tok.chunks("BREAK a red cat") == [EMPTY, a]
    assert tok.chunks("a red cat BREAK BREAK a blue dog") == [a, EMPTY, b]
    assert len(tok.chunks("cat " * 80 + "BREAK dog")) == 3
    for not_break in ["break", "Break", "BREAKfast", "cat_BREAK", "BREAK2"]:
        assert len(tok.chunks(f"a {not_break} b")) == 1
    assert tok.chunks("", min_chunks=3) == [EMPTY] * 3
    assert tok.chunks("a red cat", min_chunks=2) == [a, EMPTY]
    assert len(tok.chunks("cat " * 200, min_chunks=2)) == 3


def test_batch_call(tok):
    single = tok("a red cat")
    assert single.dtype == torch.int64 and single.shape == (1, 77)
    assert single[0].tolist() == tok.chunks("a red cat")[0]
    batch = tok(["a red cat", "cat " * 100, ""])
    assert batch.shape == (3, 154)
    assert batch[0].tolist() == tok.chunks("a red cat")[0] + EMPTY
    assert batch[1].tolist() == [i for c in tok.chunks("cat " * 100) for i in c]
    assert batch[2].tolist() == EMPTY * 2
    assert tok(["a red cat"], min_chunks=3).shape == (1, 231)
    assert tok([]).shape == (0, 77)


def test_openclip_padding_is_sd2s_tokenizer(tok, tmp_path):
    """SD 2.x's tokenizer (diffusers' stable-diffusion-2 folders: pad_token "!") pads with 0 after the end token,
    as OpenCLIP trained; booth's pad=PAD_OPENCLIP gives those ids, and SD1's padding is unchanged. (A "!" in
    the prompt itself differs: transformers then reads it as the pad token, 0, where OpenCLIP's own tokenizer,
    and booth, give the word's id, 256.)"""
    from helpers import write_clip_tokenizer
    from transformers import CLIPTokenizer

    from booth.tokenizer import PAD_OPENCLIP

    write_clip_tokenizer(tmp_path)
    sd2 = CLIPTokenizer.from_pretrained(tmp_path, unk_token="<|endoftext|>", model_max_length=77,
                                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="!")  # fmt: skip
    assert sd2.pad_token_id == PAD_OPENCLIP == 0
    prompts = ["a photo of an astronaut riding a horse", "", "sks dog, oil painting."]
    theirs = sd2(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(tok(prompts, pad=PAD_OPENCLIP), theirs)
    assert (tok(prompts)[1, 2:] == EOS).all(), "SD1 pads with the end token"
    assert tok("wow!", pad=PAD_OPENCLIP)[0, 2] == 256 != sd2("wow!").input_ids[2]

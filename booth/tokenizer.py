r"""Offline CLIP BPE tokenizer for Stable Diffusion 1.x, with AUTOMATIC1111-style long prompts.

Encoding matches ``transformers.CLIPTokenizer`` (transformers 5, ``tokenizers`` backend):

1. the literal special tokens ``<|startoftext|>`` / ``<|endoftext|>`` are cut out of the raw text first;
2. each remaining segment is normalized: NFC, then lowercased character by character (so no Greek
   final-sigma rule: "Σ" always becomes "σ"); whitespace only separates, so collapsing it is implicit;
3. pre-tokenized with CLIP's pattern ``'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+``,
   emulated by a small scanner because ``re`` has no ``\p{..}`` and ``regex`` is not a dependency;
4. each piece is byte-level encoded (GPT-2's bytes-to-unicode map) and merged with byte-pair encoding,
   the last symbol carrying the ``</w>`` end-of-word suffix.

Unlike OpenAI's reference code there is no ftfy and no HTML unescaping: transformers does neither, so
"&amp;" stays three tokens, exactly as in diffusers' SD pipelines.

Known limit: ids are identical for all text whose characters are in this Python's Unicode database
(Python 3.11: Unicode 14.0). ``tokenizers`` classifies letters/digits with Unicode 16.0 (Oniguruma) and
lowercases with Unicode 17.0 (Rust), so a letter, digit or capital encoded after Python's version (e.g.
CJK extension H, Garay, U+A7CB) is seen here as punctuation or left uncased and can tokenize differently.
"""

from __future__ import annotations

import functools
import gzip
import os
import re
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import torch

BOS, EOS = 49406, 49407
PAD_OPENCLIP = 0  # "!": what OpenCLIP pads with after the end token
CONTEXT_LEN = 77  # BOS + 75 tokens + EOS
_SPECIAL = {"<|startoftext|>": BOS, "<|endoftext|>": EOS}
_SPECIAL_SPLIT = re.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_BREAK = re.compile(r"\bBREAK\b")  # same word boundaries as AUTOMATIC1111's BREAK keyword
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Oniguruma's \s is the Unicode White_Space property. Python's str.isspace() also accepts U+001C..U+001F,
# which CLIP keeps as punctuation tokens, so the set is spelled out.
_WHITESPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    map(chr, range(0x2000, 0x200B))
)
# tokenizers' NFC still uses Unicode 9.0 tables (crate unicode-normalization-alignments): to it the combining
# marks and composable letters encoded since are plain starters that never reorder or compose. Python's
# newer tables would move or merge them, so they are kept out of unicodedata.normalize. Hex code points,
# derived against Unicode 18 (the unicodedata2 package) and checked exhaustively against tokenizers 0.23.
_NFC_OPAQUE_SPEC = (
    "5C8-5C9 7FD 897-89F 8CA-8D3 9FE C3C D3B-D3C EBA 1715 1ABF-1AF0 1DF6-1DFA A82C 105C9 105D2 105DA "
    "105E4 10D24-10D27 10D69-10D6D 10EAB-10EAC 10ECB-10ECF 10EF0-10EFB 10EFD-10EFF 10F46-10F50 "
    "10F82-10F85 11070 1133B 11382-11385 1138B 1138E 11390-11391 113B8 113BB 113C2 113C5 113C7-113C9 "
    "113CE-113D0 1145E 11839-1183A 11930 11935 11938 1193D-1193E 11943 119E0 11A34 11A47 11A99 11D42 "
    "11D44-11D45 11D97 11F41-11F42 1611E-16129 1612F 16D63 16D67-16D6A 16FF0-16FF1 1D127-1D128 "
    "1D250-1D252 1D25B-1D25C 1D25F 1D280-1D281 1E08F 1E130-1E136 1E2AE 1E2EC-1E2EF 1E4EC-1E4EF "
    "1E5EE-1E5EF 1E6E3 1E6E6 1E6EE-1E6EF 1E6F5 "
)
_DEFAULT_BPE = Path(__file__).with_name("data") / "bpe_simple_vocab_16e6.txt.gz"
_N_MERGES = 48894  # lines 1..48894 of the merges file; the rest was never used by CLIP


def _char_class(spec: str) -> str:
    """A regex character class from hex code points and ranges, e.g. "5C8-5C9 7FD"."""
    ranges = ("-".join(re.escape(chr(int(h, 16))) for h in r.split("-")) for r in spec.split())
    return "[" + "".join(ranges) + "]"


_NFC_OPAQUE = re.compile(f"({_char_class(_NFC_OPAQUE_SPEC)})")


def _bytes_to_unicode() -> list[str]:
    """GPT-2's reversible map of the 256 byte values to printable characters, indexed by byte."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table, extra = {}, 256
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:  # unprintable bytes are moved past 255 so every byte gets a visible character
            table[b], extra = chr(extra), extra + 1
    return [table[b] for b in range(256)]


_BYTE_CHARS = _bytes_to_unicode()
_CHAR_BYTES = {c: b for b, c in enumerate(_BYTE_CHARS)}


def _char_kind(c: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace or 'P' anything else, as CLIP's pattern sees a character."""
    if c.isalpha():  # documented as exactly the general categories Lu, Ll, Lt, Lm, Lo
        return "L"
    if c in _WHITESPACE:
        return " "
    return "N" if unicodedata.category(c)[0] == "N" else "P"


def _normalize(text: str) -> str:
    """NFC as tokenizers does it, then per-character lowercase (str.lower() alone applies final sigma)."""
    parts = _NFC_OPAQUE.split(text)  # odd parts are the opaque characters, kept as they are
    text = "".join(p if k % 2 else unicodedata.normalize("NFC", p) for k, p in enumerate(parts))
    return text.replace("\u03a3", "\u03c3").lower()


def _pretokenize(text: str) -> list[str]:
    """Split normalized text into the pieces CLIP's pre-tokenizer produces; whitespace is dropped."""
    pieces, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if c == "<" and text.startswith(("<|startoftext|>", "<|endoftext|>"), i):
            # Reached only via e.g. "<|EndOfText|>". The CLIP pattern takes the literal whole, then
            # transformers' byte-level step re-splits it into "<|", the name and "|>".
            end = text.index(">", i) + 1
            pieces += ["<|", text[i + 2 : end - 2], "|>"]
            i = end
            continue
        if c == "'" and (word := next((w for w in _CONTRACTIONS if text.startswith(w, i)), None)):
            pieces.append(word)
            i += len(word)
            continue
        kind = _char_kind(c)
        j = i + 1
        if kind in "LP":  # letters and "other" form runs; a number is always a piece of one character
            while j < n and _char_kind(text[j]) == kind:
                j += 1
        if kind != " ":
            pieces.append(text[i:j])
        i = j
    return pieces


def _windows(ids: list[int], size: int) -> list[list[int]]:
    """Consecutive slices of at most `size` ids; no ids still give one empty window."""
    return [ids[k : k + size] for k in range(0, len(ids), size)] or [[]]


class Tokenizer:
    """CLIP byte-level BPE tokenizer (SD 1.x text encoder), fully offline."""

    def __init__(self, bpe_path: str | os.PathLike | None = None):
        """Load the merges from `bpe_path` (gzipped OpenAI format), by default the packaged file."""
        path = _DEFAULT_BPE if bpe_path is None else bpe_path
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")[1 : _N_MERGES + 1]  # line 0 is a version header
        merges = [tuple(line.split()) for line in lines]
        # GPT-2's table lists printable bytes first, then the shifted ones: ascending by character.
        base = sorted(_BYTE_CHARS)
        tokens = base + [c + "</w>" for c in base] + ["".join(m) for m in merges]
        tokens += list(_SPECIAL)
        self._ids = {t: i for i, t in enumerate(tokens)}
        self._tokens = tokens
        self._ranks = {m: r for r, m in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}
        self.vocab_size: int = len(tokens)

    def _bpe(self, piece: str) -> list[int]:
        """Byte-pair encode one pre-tokenized piece.

        Like the `tokenizers` BPE model, merge the lowest-ranked adjacent pair, leftmost first, one at a time.
        """
        if (hit := self._cache.get(piece)) is not None:
            return hit
        symbols = [_BYTE_CHARS[b] for b in piece.encode("utf-8")]
        symbols[-1] += "</w>"
        get, never = self._ranks.get, len(self._ranks)
        ranks = [get(pair, never) for pair in zip(symbols, symbols[1:])]  # ranks[i]: symbols i and i + 1
        while ranks and (best := min(ranks)) != never:
            i = ranks.index(best)
            symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
            del ranks[i]  # only the pairs touching the merged symbol change
            if i > 0:
                ranks[i - 1] = get((symbols[i - 1], symbols[i]), never)
            if i < len(ranks):
                ranks[i] = get((symbols[i], symbols[i + 1]), never)
        ids = [self._ids[s] for s in symbols]
        if len(self._cache) < 100_000:  # bounded: prompts are user input in long-running processes
            self._cache[piece] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`: no BOS/EOS, no truncation."""
        ids: list[int] = []
        for k, part in enumerate(_SPECIAL_SPLIT.split(text)):
            if k % 2:  # odd parts are the captured special-token literals
                ids.append(_SPECIAL[part])
            else:
                for piece in _pretokenize(_normalize(part)):
                    ids += self._bpe(piece)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (lowercased, whitespace normalized); BOS/EOS are dropped."""
        text = "".join(self._tokens[int(i)] for i in ids if int(i) not in (BOS, EOS))
        data = bytes(_CHAR_BYTES[c] for c in text.replace("</w>", _BYTE_CHARS[ord(" ")]))
        return data.decode("utf-8", errors="replace").strip()

    def chunks(self, text: str, min_chunks: int = 1, chunk_len: int = 75, pad: int = EOS) -> list[list[int]]:
        """AUTOMATIC1111-style long prompt: windows of `chunk_len` ids, each as [BOS, *ids, EOS, pad, pad...].

        Every chunk has chunk_len + 2 ids. The word ``BREAK`` closes the current chunk (even an empty one).
        Chunks of the empty prompt are appended until there are at least `min_chunks`. `pad` is what fills a
        chunk after its EOS: EOS for SD1's CLIP-L (and SDXL's), `PAD_OPENCLIP` (0, "!") for OpenCLIP's (SD 2.x,
        SDXL's second encoder), as each model was trained.
        """
        if chunk_len < 1:
            raise ValueError(f"chunk_len must be positive, got {chunk_len}")
        parts = _BREAK.split(text)
        windows = [w for part in parts[:-1] for w in _windows(self.encode(part), chunk_len)]
        last = self.encode(parts[-1])
        if last or not windows:  # a trailing BREAK does not open an extra empty chunk
            windows += _windows(last, chunk_len)
        windows += [[]] * (min_chunks - len(windows))
        return [[BOS, *w, EOS] + [pad] * (chunk_len - len(w)) for w in windows]

    def __call__(self, texts: str | list[str], min_chunks: int = 1, pad: int = EOS) -> torch.Tensor:
        """Batch of prompts -> int64 tensor (B, 77 * K), K = max(chunks of any text, min_chunks)."""
        per_text = [self.chunks(t, pad=pad) for t in ([texts] if isinstance(texts, str) else texts)]
        k = max([min_chunks, *map(len, per_text)])
        empty = self.chunks("", pad=pad)[0]
        rows = [[i for c in cs + [empty] * (k - len(cs)) for i in c] for cs in per_text]
        return torch.tensor(rows, dtype=torch.int64).reshape(len(rows), k * CONTEXT_LEN)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Tokenizer:
    """The process-wide default tokenizer (packaged merges), built on first use."""
    return Tokenizer()

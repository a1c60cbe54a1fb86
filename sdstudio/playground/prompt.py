"""Prompts the A1111 way: `(word:1.2)` / `(word)` / `[word]` emphasis, `BREAK`, prompts longer than 75 tokens
(encoded in 75-token chunks and concatenated), CLIP skip, and embedding tokens.

The parser is a small hand-written scanner (no eval). Emphasis multiplies each token's hidden state, then
the chunk is rescaled to its original mean, as A1111 does, so weights shift emphasis without changing the
overall magnitude.
"""
from __future__ import annotations

import re

_TOKEN = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
UP, DOWN = 1.1, 1 / 1.1
CHUNK = 75  # tokens per chunk, without BOS/EOS


def parse_weights(text: str) -> list[tuple[str, float]]:
    """'a (red:1.3) [cat]' -> [('a ', 1.0), ('red', 1.3), (' ', 1.0), ('cat', 0.909...)]; 'BREAK' -> ('BREAK', -1)."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def scale(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group(1)
        if tok.startswith("\\"):
            res.append([tok[1:], 1.0])
        elif tok == "(":
            round_open.append(len(res))
        elif tok == "[":
            square_open.append(len(res))
        elif weight is not None and round_open and _number(weight) is not None:
            scale(round_open.pop(), _number(weight))
        elif tok == ")" and round_open:
            scale(round_open.pop(), UP)
        elif tok == "]" and square_open:
            scale(square_open.pop(), DOWN)
        else:
            for i, part in enumerate(re.split(r"\s*\bBREAK\b\s*", tok)):
                if i > 0:
                    res.append(["BREAK", -1.0])
                res.append([part, 1.0])
    for pos in round_open:  # unclosed brackets still count, as in A1111
        scale(pos, UP)
    for pos in square_open:
        scale(pos, DOWN)
    merged: list[list] = []
    for text_part, w in res:
        if merged and merged[-1][1] == w and w != -1.0:
            merged[-1][0] += text_part
        else:
            merged.append([text_part, w])
    merged = [m for m in merged if m[0] or m[1] == -1.0]
    return [(t, float(w)) for t, w in merged] or [("", 1.0)]


def _number(text: str) -> float | None:
    """A weight's value, or None when `(word:...)`, `(word:1.2.3)` or `(word:999...9)` holds no usable number: the
    text then stays as written and the bracket counts as an unclosed one (A1111 stops with an error instead)."""
    import math

    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def tokenize_weighted(text: str, tokenizer) -> list[tuple[list[int], list[float]]]:
    """Chunks of at most 75 (token id, weight) pairs; BREAK starts a new chunk."""
    chunks: list[tuple[list[int], list[float]]] = [([], [])]
    for part, w in parse_weights(text):
        if w == -1.0:
            chunks.append(([], []))
            continue
        ids = tokenizer(part, add_special_tokens=False, truncation=False).input_ids
        for i in ids:
            if len(chunks[-1][0]) == CHUNK:
                chunks.append(([], []))
            chunks[-1][0].append(i)
            chunks[-1][1].append(w)
    return chunks


def encode(text: str, tokenizer, text_encoder, clip_skip: int = 1, n_chunks: int | None = None):
    """Prompt embeddings [1, 77 * chunks, dim]; `n_chunks` pads with empty chunks (to match the other prompt)."""
    import torch

    chunks = tokenize_weighted(text, tokenizer)
    while n_chunks and len(chunks) < n_chunks:
        chunks.append(([], []))
    device = text_encoder.device
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    outs = []
    final_norm = getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm")
    for ids, weights in chunks:
        full = [bos] + ids + [eos] + [pad] * (CHUNK - len(ids))
        wts = [1.0] + weights + [1.0] * (CHUNK + 1 - len(weights))
        input_ids = torch.tensor([full], device=device)
        out = text_encoder(input_ids, output_hidden_states=clip_skip > 1)
        if clip_skip > 1:
            z = final_norm(out.hidden_states[-clip_skip])
        else:
            z = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        if any(w != 1.0 for w in wts):
            w = torch.tensor(wts, device=device, dtype=z.dtype)[None, :, None]
            mean_before = z.float().mean()
            z = z * w
            z = z * (mean_before / z.float().mean()).to(z.dtype)
        outs.append(z)
    return torch.cat(outs, dim=1)


def encode_xl(texts: list[str], tokenizers, text_encoders, clip_skip: int = 1, n_chunks: int | None = None,
              zero: bool = False):
    """SDXL conditioning: both encoders' penultimate hidden states side by side [1, 77 * chunks, 768 + 1280],
    and the second encoder's pooled projection [1, 1280] from the first chunk. `zero` gives zeros (SDXL's
    negative for an empty negative prompt)."""
    import torch

    n = n_chunks or max(chunk_count(t, tok) for t, tok in zip(texts, tokenizers))
    parts, pooled = [], None
    for idx, (text, tok, te) in enumerate(zip(texts, tokenizers, text_encoders)):
        chunks = tokenize_weighted(text, tok)
        while len(chunks) < n:
            chunks.append(([], []))
        bos, eos = tok.bos_token_id, tok.eos_token_id
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        outs = []
        for c, (ids, weights) in enumerate(chunks):
            full = [bos] + ids + [eos] + [pad] * (CHUNK - len(ids))
            wts = [1.0] + weights + [1.0] * (CHUNK + 1 - len(weights))
            out = te(torch.tensor([full], device=te.device), output_hidden_states=True)
            z = out.hidden_states[-(clip_skip + 1)]  # SDXL conditions on the penultimate layer, no final norm
            if idx == len(text_encoders) - 1 and c == 0:
                pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
            if any(w != 1.0 for w in wts):
                w = torch.tensor(wts, device=z.device, dtype=z.dtype)[None, :, None]
                mean_before = z.float().mean()
                z = z * w
                z = z * (mean_before / z.float().mean()).to(z.dtype)
            outs.append(z)
        parts.append(torch.cat(outs, dim=1))
    emb = torch.cat(parts, dim=-1)
    if zero:
        return torch.zeros_like(emb), torch.zeros_like(pooled)
    return emb, pooled


def chunk_count(text: str, tokenizer) -> int:
    return len(tokenize_weighted(text, tokenizer))

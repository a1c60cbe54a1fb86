"""Textual-inversion embeddings in the Playground: each file's vectors go into the tokenizers and text encoders
once, under internal tokens, and a prompt's trigger words are swapped for them while the item is active."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import UserError
from .files import read_adapter_file
from .recipe import EmbeddingItem


@dataclass
class LoadedEmbedding:
    path: Path
    token: str
    internal: list[list[str]]  # per text encoder: the internal tokens that carry its vectors


class PromptEmbeddings:
    """The embeddings loaded on one base, and which are active for the current recipe."""

    def __init__(self, comps, resolve: Callable[[str], Path], allow_pickle: bool = False):
        self.comps, self.resolve, self.allow_pickle = comps, resolve, allow_pickle
        self.loaded: dict[Path, LoadedEmbedding] = {}
        self.active: list[LoadedEmbedding] = []

    def apply(self, items: list[EmbeddingItem], bundled: list[LoadedEmbedding] = ()) -> None:
        """Make the recipe's embeddings (and the words bundled in its active LoRAs) the active ones."""
        active = []
        tokens = set()
        for item in items:
            if not item.enabled:
                continue
            path = self.resolve(item.path)
            loaded = self.loaded.get(path)
            if loaded is None:
                loaded = self._load(path, item.token)
            if item.token:
                loaded.token = item.token
            if loaded.token in tokens:
                raise UserError(f"Two embeddings use the token {loaded.token}: give one another token.")
            tokens.add(loaded.token)
            active.append(loaded)
        self.active = active + list(bundled)

    def _load(self, path: Path, token: str) -> LoadedEmbedding:
        from ..formats.embeddings import embedding_from_state

        if not path.is_file():
            raise UserError(f"{path.name} does not exist: check the path of the embedding.")
        sd, _meta = read_adapter_file(path, self.allow_pickle, embedding=True)
        emb = embedding_from_state(sd, path.name, token)
        emb.token = token or emb.token or f"<{path.stem}>"
        loaded = self.install(path, emb, str(len(self.loaded) + 1))
        self.loaded[path] = loaded
        return loaded

    def install(self, path: Path, emb, k: str) -> LoadedEmbedding:
        """Add an embedding's vectors to the tokenizers/text encoders under internal tokens <sdstudio-emb{k}-j>."""
        import torch

        tes, toks = self.comps.text_encoders, self.comps.tokenizers
        if len(emb.vectors) != len(tes):
            need = "clip_l and clip_g" if len(tes) == 2 else "one vector set"
            raise UserError(f"{path.name} is an embedding for another model family (this base needs {need}): "
                            f"pick a matching embedding.")
        internal = []
        for i, (te, tok, vec) in enumerate(zip(tes, toks, emb.vectors)):
            table = te.get_input_embeddings()
            if vec.shape[1] != table.weight.shape[1]:
                raise UserError(f"{path.name} has {vec.shape[1]}-wide vectors but this {self.comps.family.label} "
                                f"text encoder uses {table.weight.shape[1]}: it is for another model family.")
            names = [f"<sdstudio-emb{k}-{j}>" for j in range(vec.shape[0])]
            tok.add_tokens(names)
            te.resize_token_embeddings(len(tok))
            table = te.get_input_embeddings()
            ids = tok.convert_tokens_to_ids(names)
            with torch.no_grad():
                table.weight[ids] = vec.to(table.weight.dtype).to(table.weight.device)
            table.weight.requires_grad_(False)
            internal.append(names)
        return LoadedEmbedding(path=path, token=emb.token, internal=internal)

    def expand_prompt(self, text: str, encoder: int = 0) -> str:
        """Replace each active embedding's token with the internal tokens that carry its vectors. Disabled or
        removed embeddings are not replaced, so their token reads as plain text, as if never loaded."""
        for emb in self.active:
            pattern = rf"(?<![\w<]){re.escape(emb.token)}(?![\w>])"
            text = re.sub(pattern, " ".join(emb.internal[encoder]), text)
        return text

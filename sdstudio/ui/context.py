"""What every tab shares: the workspace, the jobs, the model cache, persisted settings, and the components
other tabs may drive ("Use this dataset", "Open in Playground", "Use as base")."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ..formats.safe_io import atomic_write_text
from ..jobs import JobManager
from ..models.cache import CACHE, ModelCache
from ..workspace import Workspace


@dataclass
class Settings:
    """Last-used values per tab, kept in workspace/settings/<tab>.json so a reload loses nothing."""

    workspace: Workspace

    def load(self, tab: str) -> dict:
        path = self.workspace.root / "settings" / f"{tab}.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return {}

    def save(self, tab: str, values: dict) -> None:
        path = self.workspace.root / "settings" / f"{tab}.json"
        atomic_write_text(path, json.dumps(values, indent=2, default=str))


@dataclass
class AppContext:
    workspace: Workspace
    jobs: JobManager = field(default_factory=JobManager)
    cache: ModelCache = field(default_factory=lambda: CACHE)
    settings: Settings | None = None
    # Components a tab exposes to others, by name: "tabs" (the gr.Tabs), "train.dataset",
    # "playground.add_lora", "base_model" pickers, ... Filled during build(), read during wire().
    components: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = Settings(self.workspace)

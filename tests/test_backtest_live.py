"""The backtest's fast live-correction path decides exactly what the core's arithmetic decides (bench/backtest.py
``check_live_path``), on a synthetic year: the figures it reports are the library's."""

from __future__ import annotations

import importlib.util
import math
import random
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def backtest() -> ModuleType:
    spec = importlib.util.spec_from_file_location("backtest_under_test", ROOT / "bench" / "backtest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def synthetic(backtest: ModuleType, hours: int, seed: int) -> tuple[object, object]:
    rng = random.Random(seed)
    origin = datetime(2023, 1, 1, tzinfo=timezone.utc).timestamp()
    typical = [300 + 80 * math.sin(2 * math.pi * (k % 24) / 24) for k in range(hours)]
    level, truth = 0.0, []
    for k in range(hours):
        level = 0.9 * level + rng.gauss(0, 25)
        truth.append(max(0.0, typical[k] + level + rng.gauss(0, 10)))
    return backtest.Series.of(origin, typical), backtest.Series.of(origin, truth)


@pytest.mark.parametrize(
    ("half_life", "span", "yesterday"), [(96, 1, 0.25), (6, 3, 0.0), (math.inf, 1, 0.35), (2, 6, 0.15)]
)
def test_fast_path_equals_the_core(backtest: ModuleType, half_life: float, span: float, yesterday: float) -> None:
    offline, truth = synthetic(backtest, 24 * 20, seed=round(half_life * 10) if math.isfinite(half_life) else 7)
    compared = backtest.check_live_path(offline, truth, 24, backtest.LiveSetting(half_life, span, yesterday), 7)
    assert compared > 100


def test_no_correction_is_the_profile_shifted(backtest: ModuleType) -> None:
    """No yesterday blend and no fading: every hour moves by the same anomaly, so the plan is the profile's."""
    offline, truth = synthetic(backtest, 24 * 5, seed=3)
    config = backtest.CONFIGS[0]
    setting = backtest.LiveSetting(math.inf, 1, 0.0)
    for now_h in (30.0, 41.5, 77.25):
        live = backtest.live_series(offline, truth, now_h, config, setting)
        first = math.floor(now_h)
        shift = truth.values[first - 1] - offline.values[first - 1]
        profile = offline.values[first : first + len(live.values)]
        assert live.values == pytest.approx([max(0.0, v + shift) for v in profile])


def test_shipped_setting_is_in_the_validation_grid(backtest: ModuleType) -> None:
    import carbonaware_core as core

    shipped = backtest.LiveSetting(
        core.LIVE_HALF_LIFE.total_seconds() / 3600, core.LIVE_SPAN.total_seconds() / 3600, core.LIVE_YESTERDAY_WEIGHT
    )
    assert shipped in backtest.LIVE_GRID

"""Run outputs: the modelled time to a target perplexity."""

from __future__ import annotations

from pathlib import Path

from fedpeat.outputs import plot_metrics, time_to_target


def test_time_to_target_sums_latencies_until_the_first_crossing() -> None:
    rows = [
        {"plugin_ppl": 115.0},
        {"plugin_ppl": 110.0, "latency_s": 30.0},
        {"plugin_ppl": 104.0, "latency_s": 20.0},
        {"plugin_ppl": 100.0, "latency_s": 5.0},
    ]
    assert time_to_target(rows, 105.0) == 50.0
    assert time_to_target(rows, 120.0) == 0.0
    assert time_to_target(rows, 90.0) is None


def test_ppl_png_draws_perplexity_on_a_log_scale(tmp_path: Path, monkeypatch) -> None:
    """The emulators' thousands must not flatten the plug-in curve: ppl.png's axis is log."""
    from matplotlib.figure import Figure

    scales: dict[str, str] = {}
    save = Figure.savefig

    def recording_savefig(fig, fname, *args, **kwargs):  # type: ignore[no-untyped-def]
        scales[Path(fname).name] = fig.axes[0].get_yscale()
        return save(fig, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording_savefig)
    rows = [
        {"round": 0, "plugin_ppl": 115.2, "bytes_down": 0, "bytes_up": 0},
        {"round": 1, "plugin_ppl": 112.5, "emulator_ppl": 9143.7, "bytes_down": 2**20},
        {"round": 2, "plugin_ppl": 99.5, "emulator_ppl": 1562.3, "bytes_down": 2**20},
    ]
    written = plot_metrics(rows, tmp_path)
    assert [p.name for p in written] == ["ppl.png", "bytes.png"]
    assert scales == {"ppl.png": "log", "bytes.png": "linear"}
    assert (tmp_path / "ppl.png").read_bytes()[:4] == b"\x89PNG"

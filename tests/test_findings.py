"""What the report says a run's numbers mean: the merged model's change, stage 1's own contribution against the
alignment-only control, units, and where the run ran."""

from __future__ import annotations

from elo_cpt import findings, report


def metrics_with(**bits: tuple[float, float]) -> dict:
    """A run's metrics with the given (German, English) bits/char per model."""
    return {"config": {"target_language": "de", "layers": "0,-1", "data": {"replay_language": "en"}},
            "eval": {name: {"de": {"bits_per_char": de, "bits_per_byte": de}, "en": {"bits_per_char": en, "bits_per_byte": en}}
                     for name, (de, en) in bits.items()},
            "stages": {"stage1": {"seconds": 10.0, "training": {"tokens": 100, "seconds": 9.0, "final_loss": 6.4, "trainable_params": 7}},
                       "align": {"seconds": 5.0, "training": {"tokens": 10, "seconds": 4.0, "final_loss": 3.5, "trainable_params": 9}}},
            "total_seconds": 15.0}


def test_a_merged_model_worse_than_the_base_is_explained():
    notes = findings.explanations(metrics_with(base=(1.8953, 1.0), merged=(1.9001, 1.0), final=(1.80, 1.0)))
    assert notes[0].startswith("Before alignment, the merged model (the base with stage 1's layers 0,-1 written back) is "
                               "0.3% worse than the base in German (1.8953 → 1.9001 bits/char). Stage 1 trained")
    assert "rerun it with control=true" in notes[1] and len(notes) == 2


def test_a_merged_model_as_good_as_the_base_is_said_plainly():
    notes = findings.explanations(metrics_with(base=(1.8466, 1.0), merged=(1.8472, 1.0), final=(1.76, 1.0)))
    assert "is practically unchanged from the base (+0.03%) in German" in notes[0] and "Stage 1 trained" not in notes[0]


def test_stage_1_contribution_against_the_control():
    def verdict(final: float, control: float) -> str:
        notes = findings.explanations(metrics_with(base=(2.0, 1.0), merged=(1.9, 1.0), final=(final, 1.0), control=(control, 1.0)))
        assert not any("control=true" in note for note in notes)
        return notes[-1]

    assert verdict(1.70, 1.80).endswith("5.6% better than the alignment-only control, which aligned the base model on "
                                        "the same data and budget without stage 1 (1.8000 → 1.7000 bits/char): stage 1 "
                                        "added to the alignment's gain.")
    assert verdict(1.7636, 1.7610).endswith("the alignment alone did better than ELO, so stage 1 cost more than it gave.")
    assert verdict(1.7610, 1.7611).endswith("stage 1 earned nothing measurable over the alignment alone.")


def test_the_report_names_units_and_what_each_stage_trained():
    metrics = metrics_with(base=(2.0, 1.0), merged=(1.9, 1.0), final=(1.8, 1.0), control=(1.85, 1.0))
    cost = report.cost_table(metrics)
    assert cost["header"][1] == "model trained" and "last loss (nats/token)" in cost["header"]
    assert [row["cells"][1]["text"] for row in cost["rows"]] == ["shallow model", "full model", ""]  # and the total
    assert report.forgetting_table(metrics)["header"][2:5] == ["before (bits/char)", "final (bits/char)", "change (bits/char)"]
    assert "control: alignment only (no stage 1)" in report.summary(metrics)


def test_environment_line():
    metrics = {"environment": {"finished": "2026-11-29 17:00 UTC", "elo_cpt": "0.1.0", "python": "3.11.2", "device": "cuda",
                               "gpu": "NVIDIA H100", "gpus": 8, "torch": "2.13.0", "transformers": "5.24.0", "processes": 8,
                               "precision": {"stage1": "bf16-mixed", "align": "bf16-mixed"}}}
    assert findings.environment_line(metrics) == ("finished 2026-11-29 17:00 UTC on NVIDIA H100 x 8, 8 processes, bf16-mixed; "
                                                  "elo-cpt 0.1.0, torch 2.13.0, transformers 5.24.0, Python 3.11.2")
    assert findings.environment_line({}) == ""

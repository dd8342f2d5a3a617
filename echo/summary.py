"""The line a run ends its printout with, for a single run (echo.train) and a population's members
(echo.module.PopulationModule): plain Python."""


def summary_line(s: dict[str, float]) -> str:
    """Test accuracy, epochs and training time; when reached, the target's epoch; with tested lengths, the OOD score."""
    line = (
        f"test/token_acc {s['test/token_acc']:.4f}  test/exact_match {s['test/exact_match']:.4f}  "
        f"after {s['epochs']} epochs, {s['train_time_s']:.1f} s training"
    )
    if "time_to_target_s" in s:
        line += f"; target reached at epoch {s['epochs_to_target']} ({s['time_to_target_s']:.1f} s)"
    if "test/ood_exact_match" in s:
        line += f"\ntest/ood_exact_match {s['test/ood_exact_match']:.4f} (lengths above the trained ones)"
    return line

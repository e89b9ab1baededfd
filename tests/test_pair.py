"""studies.pair: A − B pooled over seeds from prediction CSVs in different results folders."""
import numpy as np
import pandas as pd
import pytest

from common.errors import MeloError
from studies import pair, tables


def predictions(seed, shift, users=200):
    """One seed's test CSV frame: `shift` > 0 moves every prediction `shift` stars towards its rating."""
    rng = np.random.default_rng(seed)
    rating = rng.integers(1, 6, users).astype(float)
    guess = rating + rng.normal(0, 1.0, users)
    return pd.DataFrame({"user": np.arange(users) + 1000 * seed, "window": 0, "item": rng.integers(1, 50, users),
                         "rating": rating, "prediction": guess - shift * np.sign(guess - rating)})


def write(tmp_path, folder, seed, frame, name="gru4rec_ml-1m_melo_step300.test_best.csv"):
    path = tmp_path / folder / f"seed{seed}" / "checkpoints" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False)
    return path


def test_pairs_each_seed_with_its_own_and_pools_them(tmp_path, capsys):
    # A is better than B in seeds 1 and 2 and worse in seed 3
    for seed, shift in ((1, 0.3), (2, 0.3), (3, -0.1)):
        base = predictions(seed, 0.0)
        write(tmp_path, "a", seed, predictions(seed, shift))
        write(tmp_path, "b", seed, base, name="fold-in-blend_ml-1m.test.csv")
        write(tmp_path, "b", seed, base.assign(prediction=0.0), name="fold-in-blend_ml-1m.test.validation.csv")
    found = pair.main([f"{tmp_path}/a/seed*/checkpoints/*.test_best.csv", f"{tmp_path}/b/seed*/checkpoints/*.test.csv",
                       "--bootstrap=300"])
    expected = tables.pooled_difference([(predictions(s, shift), predictions(s, 0.0))
                                         for s, shift in ((1, 0.3), (2, 0.3), (3, -0.1))], 300, 0)
    assert found["rmse"]["difference"] == pytest.approx(expected["rmse"]["difference"])
    assert found["rmse"]["difference"] < 0
    assert found["rmse"]["low"] == pytest.approx(expected["rmse"]["low"])
    assert found["rmse"]["users"] == 600 and found["rmse"]["lower"] == 2
    out = capsys.readouterr().out
    assert "A − B, RMSE: " in out and "over 600 users of 3 seeds" in out and "A lower in 2/3" in out
    assert out.count("\nB ") + out.startswith("B ") == 3 and ".validation.csv" not in out


def test_a_pair_of_other_seeds_or_counts_is_refused(tmp_path):
    a1, a2 = write(tmp_path, "a", 1, predictions(1, 0.2)), write(tmp_path, "a", 2, predictions(2, 0.2))
    b1, b2 = write(tmp_path, "b", 1, predictions(1, 0.0)), write(tmp_path, "b", 2, predictions(2, 0.0))
    with pytest.raises(MeloError, match="not on the same test targets"):
        pair.main([f"{a1},{a2}", f"{b2},{b1}"])  # seed 2's users against seed 1's
    with pytest.raises(MeloError, match="2 CSVs against 1"):
        pair.main([f"{a1},{a2}", f"{b1}"])
    with pytest.raises(MeloError, match="no prediction CSV matches"):
        pair.main([f"{tmp_path}/c/*.csv", f"{b1}"])
    validation = write(tmp_path, "c", 1, predictions(1, 0.0), name="x.test.validation.csv")
    with pytest.raises(MeloError, match="is a validation CSV"):
        pair.main([f"{a1}", str(validation)])
    report = tmp_path / "report.json"
    report.write_text("{}")
    with pytest.raises(MeloError, match="is not a prediction CSV"):
        pair.main([f"{a1}", str(report)])

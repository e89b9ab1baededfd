"""What several test modules share: parsed options for a small data set (`make_args`), a small main.py /
train_original.py run's flags, the checks that a
failure ends in one `error:` line, and an edit of a ratings file that keeps its size and mtime."""
import os

import pytest

import options

SCRIPTS = ("main.py", "train_original.py", "compare.py", "ablation.py")


def small(ratings_file, tmp_path, *extra):
    """A small GRU4Rec run of main.py or train_original.py into tmp_path."""
    return ["--mode=ml-100k", f"--data_path={ratings_file}", f"--data_dir={tmp_path}/Data", "--min_item=1",
            "--num_test_data=20", "--val_size=10", "--batch_size=4", "--num_samples=5", "--num_query_set=2",
            "--max_seq_len=10", "--model=gru4rec", "--gru4rec_hidden_size=16", "--log_interval=2",
            "--num_train_iterations=4", "--inner_lr=0.05", "--num_threads=1", "--pretrain_epochs=1",
            f"--checkpoint_dir={tmp_path}/ckpt", f"--log_dir={tmp_path}/runs", f"--pretrain_log_dir={tmp_path}/pre",
            *extra]


def one_line_error(argv, capsys, main_function, parse=options.parse_args):
    """Run `main_function` through run_cli with `argv` (`parse`d: the study scripts parse their own); return
    its single stderr line (exit status 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        options.run_cli(main_function, argv, parse)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def one_line_of(done):
    """The single stderr line of a finished script (exit status 2)."""
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def same_size_edit(path):
    """Change ratings without changing the file's size, then restore its mtime (`touch -r`)."""
    before = os.stat(path)
    lines = open(path).read().splitlines(keepends=True)
    for number in range(0, len(lines), 3):   # every third rating: 5 <-> 1, other values kept
        user, item, rating, timestamp = lines[number].split("\t")
        lines[number] = "\t".join((user, item, {"5": "1", "1": "5"}.get(rating, rating), timestamp))
    with open(path, "w") as handle:
        handle.write("".join(lines))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def make_args(mode, data_path, tmp_path, **flags):
    """Parsed options for a test: data in `data_path` (None = the mode's default under tmp_path/Data),
    caches and outputs under tmp_path, and small sizes unless overridden by `flags`."""
    values = {"data_dir": os.path.join(str(tmp_path), "Data"), "min_item": 10, "min_sequence": 5,
              "max_seq_len": 20, "num_samples": 8, "num_query_set": 3, "num_test_data": 30,
              "val_size": 20, "batch_size": 4, "checkpoint_dir": os.path.join(str(tmp_path), "checkpoints"),
              "log_dir": os.path.join(str(tmp_path), "runs"),
              "pretrain_log_dir": os.path.join(str(tmp_path), "pretrained")}
    values.update(flags)
    argv = [f"--mode={mode}"] + [f"--{k}={v}" for k, v in values.items()]
    if data_path is not None:
        argv.append(f"--data_path={data_path}")
    return options.parse_args(argv)

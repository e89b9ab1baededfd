"""compare.py's tables: from the runs' reports (and their per-target CSVs) to the markdown text of
`comparison.md` and the JSON-ready summary of every cell.

`build_tables` puts the sections together: RMSE and MAE per window and per user, per rating value, per
support rating (MELO's weights, the query gradient), the paired bootstrap intervals, and what a network
adds beyond the biases (meta-learner − the best no-network baseline, the fold-in against each method,
the blend). The statistics are metrics.py's; reading and running the reports is compare.py's.
"""
import math
import shlex

import numpy as np
import pandas as pd

from common.errors import MeloError
from evaluation import baselines, metrics, tuning
from models import BACKBONES, HEADS
from studies.study import START_DESCRIPTIONS, cell, mean_std
from training.analysis import SHARE_NAMES


def display(model):
    """A backbone's name in tables and figures (its registry entry's display_name)."""
    return BACKBONES[model].display_name


METHOD_NAMES = {**{name: baseline.label for name, baseline in baselines.BASELINES.items()},
                "basic": "Basic", "finetune": "Fine-tune", "maml": "MAML", "melo": "MELO"}
PAIRED = ("maml", "finetune", "basic")  # MELO − each of them, paired on the same test users
# What a network adds beyond the biases: each meta-learner − the better of these on validation (paired), and
# each neural method blended with the user + item bias fold-in, w chosen on the validation users.
NO_NETWORK = ("user-item-bias", "mf-fold-in")
FOLD_IN = "user-item-bias"
# and − the MF fold-in recalibrated on the validation users (not a candidate for the best above: its two
# numbers are fitted on the users that score it there)
RECALIBRATED = "mf-fold-in-recalibrated"
FOLD_IN_BLEND = "fold-in-blend"  # likewise: its s is chosen on those users
BLEND_WEIGHTS = tuple(round(0.05 * k, 2) for k in range(21))


def same_targets(melo, other):
    """Two per-target frames joined by user and window (`prediction_other` the second's), refused unless
    they hold the same targets."""
    joined = melo.merge(other, on=["user", "window"], suffixes=("", "_other"), validate="one_to_one")
    if len(joined) != len(melo) or len(joined) != len(other) or not (
            (joined["item"] == joined["item_other"]).all() and (joined["rating"] == joined["rating_other"]).all()):
        raise MeloError("two methods' predictions are not on the same test targets: were they run with other "
                        "data flags? Use another --results_dir")
    return joined


def per_user_pair(melo, other):
    """(MELO's, other's) metrics.per_user_errors on the same test targets (matched by user and window)."""
    keys = ["user", "window"]
    joined = same_targets(melo, other)
    return (metrics.per_user_errors(joined[keys + ["rating", "prediction"]]),
            metrics.per_user_errors(joined[keys + ["rating"]].assign(prediction=joined["prediction_other"])))


def paired_difference(melo, other, resamples, seed):
    """metrics.paired_bootstrap of MELO − other on the same test targets (matched by user and window): one
    seed's pooled_difference (one stratum draws as no strata do)."""
    return pooled_difference([(melo, other)], resamples, seed)


def pooled_difference(pairs, resamples, seed):
    """MELO − other over every seed's test users pooled (`pairs`: per seed, the two prediction frames):
    the difference of the pooled metrics, its bootstrap interval drawing users within each seed
    (metrics.paired_bootstrap's strata), and its half width, the smallest difference it resolves."""
    per_seed = [per_user_pair(melo, other) for melo, other in pairs]
    a = pd.concat([a for a, _ in per_seed])
    b = pd.concat([b for _, b in per_seed])
    strata = np.concatenate([np.full(len(a_seed), k) for k, (a_seed, _) in enumerate(per_seed)])
    found = metrics.paired_bootstrap(a["squared_error"], b["squared_error"], a["windows"], a["rating"], resamples,
                                     seed, strata=strata)
    for result in found.values():
        result["half_width"] = (result["high"] - result["low"]) / 2
        result["users"] = len(a)
    return found


def blend(method_val, fold_in_val, method_test, fold_in_test):
    """w · fold-in + (1 − w) · method with w from BLEND_WEIGHTS chosen by the validation users' per-window
    RMSE; that w, and the blend's per-window RMSE on the test users."""
    def rmse(joined, w):
        blended = w * joined["prediction_other"] + (1 - w) * joined["prediction"]
        return math.sqrt(((blended - joined["rating"]) ** 2).mean())

    validation, test = same_targets(method_val, fold_in_val), same_targets(method_test, fold_in_test)
    scores = [rmse(validation, w) for w in BLEND_WEIGHTS]
    w = BLEND_WEIGHTS[int(np.argmin(scores))]
    return {"w": w, "rmse": rmse(test, w), "validation_rmse": min(scores)}


CROSS_FITTED, GRID_MINIMUM = "cross-fitted", "grid minimum"


def best_no_network(reports, seed_index):
    """The baseline of NO_NETWORK with the lowest cross-fitted validation score in seed `seed_index`
    (baselines.cross_fitted_score: the grids' minima favour the larger grid), the scores {name: score}, and
    the rule (CROSS_FITTED; GRID_MINIMUM, for all alike, where a report is from before that score)."""
    selections = {name: reports[(None, name)][seed_index]["selection"] for name in NO_NETWORK}
    rule = CROSS_FITTED if all("cross_fitted_score" in found for found in selections.values()) else GRID_MINIMUM
    scores = {name: found["cross_fitted_score"] if rule == CROSS_FITTED else min(found["validation_scores"])
              for name, found in selections.items()}
    return min(scores, key=scores.get), scores, rule


def paired_cell(results, pooled=None):
    """One seed: `difference [low, high]`; several: the mean of the differences with its 95% t interval
    over the seeds, in how many seeds MELO is lower, and in how many its own interval lies below 0; and with
    `pooled` (pooled_difference's result for this metric) the pooled difference, its bootstrap interval
    and the smallest difference that interval resolves (its half width)."""
    differences = [r["difference"] for r in results]
    if len(results) == 1:
        r = results[0]
        return f"{r['difference']:+.4f} [{r['low']:+.4f}, {r['high']:+.4f}]"
    mean, low, high = metrics.seed_interval(differences)
    below = sum(r["high"] < 0 for r in results)
    text = (f"{mean:+.4f} [{low:+.4f}, {high:+.4f}] over seeds; lower in {sum(d < 0 for d in differences)}/"
            f"{len(results)}, interval below 0 in {below}/{len(results)}")
    if pooled is not None:
        text += (f"; pooled over {pooled['users']} users {pooled['difference']:+.4f} [{pooled['low']:+.4f}, "
                 f"{pooled['high']:+.4f}], resolves ±{pooled['half_width']:.4f}")
    return text


def summary_of(values):
    mean, std = mean_std(values)
    return {"per_seed": values, "mean": mean, "std": std}


def reduction(better, baseline):
    """Per seed, how much lower `better`'s error is than `baseline`'s, in percent of the baseline's."""
    return [100.0 * (b - a) / b if a is not None and b else None for a, b in zip(better, baseline)]


def query_gradient_t(report, key="query_gradient_by_rating"):
    """{rating (or share bin): t} of a report's query gradient summary (None where one user had it)."""
    found = report.get(key)
    return None if found is None else {name: row["t"] for name, row in found.items()}


def at_edge(report):
    """{axis: side} of the grid axes whose choice in `report` stayed on an edge ({}: none, or no grid)."""
    selection = report.get("selection") or report.get("finetune_selection") or {}
    return selection.get("at_edge") or {}


def rating_key(text):
    return float(text)


def methods(config):
    return ["basic"] + (["finetune"] if config.finetune_steps_grid else []) + ["maml", "melo"]


def method_label(config, method):
    if method == "finetune":
        return "Fine-tune (tuned)"
    if method == "basic" and config.learned_loss_baseline:
        return "Basic (learned loss)"
    return METHOD_NAMES[method]


def reports_of(reports, model, method):
    """The reports (one per seed) of a backbone's method; a baseline's are the same for every backbone."""
    return reports[(None if method in baselines.BASELINES else model, method)]


def figure_reports(config, reports):
    """{backbone: {method label: report-like dict}}: each rating's RMSE and mean prediction averaged over
    the seeds whose test users have that rating."""
    def averaged(picked):
        per_rating = {}
        for rating in sorted({k for r in picked for k in r["per_rating"]}, key=rating_key):
            rows = [r["per_rating"][rating] for r in picked if rating in r["per_rating"]]
            per_rating[rating] = {key: mean_std([row[key] for row in rows])[0] for key in ("rmse", "mean_prediction")}
        return {"per_rating": per_rating}

    return {display(model): {method_label(config, method): averaged(reports_of(reports, model, method))
                             for method in list(baselines.BASELINES) + methods(config)}
            for model in config.models}


def values(reports, model, method, key, per_user=False):
    """One cell's per-seed values of `key` (per window, or per user); a report from before per-user
    metrics has none, and its cell shows –."""
    return [(r.get("per_user", {}) if per_user else r).get(key) for r in reports_of(reports, model, method)]


def edge_reason(found):
    """Why the choices of reports `found` on their grid's edge sit there: a minimum the grid's extensions did
    not get off its edge, or a one-standard-error choice (--grid_choice) on its simpler edge, not extended."""
    one_se = {r.get("selection", {}).get("grid_choice") == "one-se" for r in found if at_edge(r)}
    extended = f"still on the edge of its grid after {tuning.MAX_EXTENSIONS} extensions"
    simpler = "a one-standard-error choice on its grid's simpler edge (not extended)"
    if one_se == {True}:
        return simpler
    return extended if one_se == {False} else f"{extended}, or {simpler}"


def metric_table(config, reports, summary, per_user):
    """RMSE and MAE of every method per backbone (per window, or per user), MELO's error reduction against
    Basic and MAML, and a note for each choice still on its grid's edge."""
    models = config.models
    store = summary["per_user" if per_user else "rmse_mae"]
    header = "| Method | " + " | ".join(f"{display(m)} RMSE | {display(m)} MAE" for m in models) + " |"
    lines = [header, "|---|" + "---:|---:|" * len(models)]
    notes = []
    for method in list(baselines.BASELINES) + methods(config):
        row = [method_label(config, method)]
        for model in models:
            edges = [at_edge(r) for r in reports_of(reports, model, method)]
            for key in ("rmse", "mae"):
                vals = values(reports, model, method, key, per_user)
                # † : a choice that the grid's extensions did not get off its edge (tuning.py)
                row.append(cell(vals) + (" †" if key == "rmse" and any(edges) else ""))
                store.setdefault(model, {}).setdefault(method, {})[key] = summary_of(vals)
            store[model][method]["at_edge"] = edges
            if any(edges) and (method not in baselines.BASELINES or model == models[0]):
                axes = sorted({f"{axis} ({side})" for found in edges for axis, side in found.items()})
                where = "" if method in baselines.BASELINES else f" on {display(model)}"
                reason = edge_reason(reports_of(reports, model, method))
                notes.append(f"† {method_label(config, method)}{where}: {reason} ({', '.join(axes)}) in "
                             f"{sum(map(bool, edges))} of {len(edges)} seeds.")
        lines.append("| " + " | ".join(row) + " |")
    for other in ("basic", "maml"):
        row = [f"MELO vs {METHOD_NAMES[other]} (error reduction)"]
        for model in models:
            for key in ("rmse", "mae"):
                vals = reduction(values(reports, model, "melo", key, per_user),
                                 values(reports, model, other, key, per_user))
                row.append(cell(vals, percent=True))
                if not per_user:
                    summary["improvement_percent"].setdefault(model, {}).setdefault(f"vs_{other}", {})[key] = \
                        summary_of(vals)
        lines.append("| " + " | ".join(row) + " |")
    return lines + ([""] + notes if notes else [])


def per_rating_table(config, reports, summary):
    """RMSE per target rating value and the mean of the per-rating RMSEs: the baselines once ("all"), each
    network per backbone."""
    ratings = sorted({k for rs in reports.values() for r in rs for k in r["per_rating"]}, key=rating_key)
    lines = ["| Backbone | Method | " + " | ".join(f"{r} ★" for r in ratings) + " | mean of per-rating |",
             "|---|---|" + "---:|" * (len(ratings) + 1)]
    rows = [("all", None, method) for method in baselines.BASELINES]
    rows += [(display(model), model, method) for model in config.models for method in methods(config)]
    for backbone, model, method in rows:
        picked = reports[(model, method)]
        row = [backbone, method_label(config, method)]
        store = summary["per_rating_rmse"].setdefault(model or "all", {}).setdefault(method, {})
        for rating in ratings:
            vals = [r["per_rating"][rating]["rmse"] for r in picked if rating in r["per_rating"]]
            row.append(cell(vals, seeds=len(picked)))
            store[rating] = summary_of(vals)
        vals = [r["mean_per_rating_rmse"] for r in picked]
        row.append(cell(vals))
        store["mean_per_rating_rmse"] = summary_of(vals)
        lines.append("| " + " | ".join(row) + " |")
    return lines


def support_table(config, reports, title, columns, labels, readers, store):
    """A table of (backbone, label, one cell per column) rows from each reader's {column: value} of the
    reports (mean ± std over seeds); empty for reports from before the field. `store(model, method, key)`:
    the summary dict that the row's cells go into."""
    rows = []
    for model in config.models:
        for method, key, label, read in readers:
            picked = [read(r) for r in reports[(model, method)]]
            if not any(picked):
                continue
            row, cells = [display(model), label], store(model, method, key)
            for column in columns:
                vals = [found.get(column) for found in picked if found]
                row.append(cell(vals, seeds=len(picked)))
                cells[column] = summary_of(vals)
            rows.append("| " + " | ".join(row) + " |")
    if not rows:
        return []
    return [f"| Backbone | {title} | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(columns)] + rows


def support_tables(config, reports, summary):
    """What the meta-learners do with each support rating: MELO's learned weight, and the t statistic of
    the query loss's gradient of more weight on it (|t| well below 2: no re-weighting by rating value to
    learn); and the same t with each user's support positions grouped by their rating's share of that
    user's ratings. Two tables (each empty for reports from before the field)."""
    support_ratings = sorted({k for rs in reports.values() for r in rs for k in
                              [*r.get("adaptive_weight_by_rating", {}), *r.get("query_gradient_by_rating", {})]},
                             key=rating_key)  # a support rating need not be any query target's
    by_support = support_table(
        config, reports, "Per support rating", support_ratings, [f"{r} ★" for r in support_ratings],
        (("melo", "weight", "MELO's weight", lambda r: r.get("adaptive_weight_by_rating")),
         ("maml", "query_gradient_t", "MAML query-gradient t", query_gradient_t),
         ("melo", "query_gradient_t", "MELO query-gradient t", query_gradient_t)),
        lambda model, method, key: summary["by_support_rating"].setdefault(model, {}).setdefault(
            method, {}).setdefault(key, {}))
    by_share = support_table(
        config, reports, "Share of the user's support set", SHARE_NAMES, SHARE_NAMES,
        [(method, None, f"{METHOD_NAMES[method]} query-gradient t by share",
          lambda r: query_gradient_t(r, "query_gradient_by_share")) for method in ("maml", "melo")],
        lambda model, method, key: summary["by_support_share"].setdefault(model, {}).setdefault(method, {}))
    return by_support, by_share


def paired_table(config, predictions, summary):
    """MELO − each of PAIRED on the same test users, per backbone: paired bootstrap intervals."""
    models = config.models
    lines = ["| Difference | " + " | ".join(f"{display(m)} RMSE | {display(m)} mean per-rating RMSE"
                                            for m in models) + " |", "|---|" + "---:|---:|" * len(models)]
    for other in [m for m in PAIRED if m in methods(config)]:
        row = [f"MELO − {METHOD_NAMES[other]}"]
        for model in models:
            pairs = list(zip(predictions[(model, "melo")], predictions[(model, other)]))
            results = [paired_difference(melo, base, config.bootstrap, config.bootstrap_seed) for melo, base in pairs]
            pooled = pooled_difference(pairs, config.bootstrap, config.bootstrap_seed) if len(pairs) > 1 else None
            for key in ("rmse", "mean_per_rating_rmse"):
                per_seed = [r[key] for r in results]
                row.append(paired_cell(per_seed, pooled and pooled[key]))
                differences = [r["difference"] for r in per_seed]
                over_seeds = metrics.seed_interval(differences)
                summary["paired"].setdefault(model, {}).setdefault(f"melo_minus_{other}", {})[key] = {
                    **summary_of(differences), "intervals": per_seed,
                    "seed_interval": None if over_seeds is None else list(over_seeds[1:]),
                    "pooled": pooled and pooled[key], "melo_lower": sum(d < 0 for d in differences)}
        lines.append("| " + " | ".join(row) + " |")
    return lines


def introduction(config, reports, meta_args):
    """The title, what was run (from `meta_args`, the parsed flags of the seed's MAML / MELO runs) and
    the command."""
    counts = sorted({r["count"] for rs in reports.values() for r in rs})
    users = sorted({r["per_user"]["count"] for rs in reports.values() for r in rs if "per_user" in r})
    seeds = ("seeds " if len(config.seeds) > 1 else "seed ") + ", ".join(seed.label for seed in config.seeds)
    spread = " (mean ± standard deviation over seeds)" if len(config.seeds) > 1 else ""
    select_by = meta_args.select_by  # shared by every run: the start flags do not set it
    outer_loss = {"all": "every query position", "target": "the query target",
                  "balanced": "the query target, each rating weighted by its inverse share"}[meta_args.query_loss]
    head_class = HEADS[meta_args.rating_head]
    head = head_class.describe(meta_args)
    adapted = "every parameter" if meta_args.inner_params == "all" else "the output layer"
    if head_class.user_parameters and meta_args.adapt_user_bias:
        adapted += " and the user's parameters"
    melo = (f"MELO's weights {meta_args.adaptive_weights}, task state {meta_args.task_state}"
            + (", fitting the start too" if meta_args.weighted_start else "")
            + (", reading each rating's recency" if meta_args.weight_recency else ""))
    return [
        f"# Comparison on {config.mode}",
        "",
        f"Data `{config.data_path}`; {seeds}{spread}; every network with the {meta_args.rating_head} rating head"
        + head + f"; MAML / MELO: {config.iterations} iterations"
        f" from {START_DESCRIPTIONS[config.start]} (inner loop adapting {adapted}, inner lr from "
        f"{meta_args.inner_lr:g}, outer loss on {outer_loss}; {melo}), tested at the last "
        f"checkpoint with the best-by-validation weights; Basic: {config.epochs} epochs, best-by-validation "
        f"weights (validation {select_by}); {'/'.join(map(str, counts))} test query windows "
        f"({'/'.join(map(str, users)) or '?'} test users) per seed, in stars. Error reduction: "
        "(other − MELO) / other, positive when MELO's error is lower.",
        "",
        f"Command: `python compare.py {shlex.join(config.argv)}`",
    ]


def build_tables(config, reports, meta_args, predictions=None, validation=None):
    """The markdown text and a JSON-ready summary of every cell (per-seed values and their mean / std).
    `meta_args`: the parsed flags of the MAML / MELO runs (for the introduction); `predictions`
    (compare.read_predictions) adds the paired bootstrap tables, `validation` (compare.read_validation)
    the blend with the fold-in."""
    summary = {"rmse_mae": {}, "per_user": {}, "per_rating_rmse": {}, "improvement_percent": {}, "paired": {},
               "by_support_rating": {}, "by_support_share": {}, "beyond_biases": {}}
    text = introduction(config, reports, meta_args) + [
        "", "## RMSE and MAE per query window", "",
        "Every query window counts; a test user's windows all end on the same target item.", "",
        *metric_table(config, reports, summary, False),
        "", "## RMSE and MAE per user", "",
        "Each user is scored once, on the mean of its query windows' predictions.", "",
        *metric_table(config, reports, summary, True),
        "", "## RMSE per rating value (per query window)", "", *per_rating_table(config, reports, summary)]
    by_support, by_share = support_tables(config, reports, summary)
    if by_support:
        text += ["", "## Per support rating: MELO's weight, the query loss's gradient", "",
                 "MELO's mean weight on the test users' support positions of each rating; for both meta-learners "
                 "the t statistic over the test users of the derivative of their query loss when that rating's "
                 "support positions gain weight (negative: more weight would lower it; |t| well below 2: no "
                 "consistent re-weighting by rating value to learn). Mean ± std over seeds.", "", *by_support]
        if by_share:  # (the share came with a later version of the reports)
            text += ["", "The same t with each user's support positions grouped by how common their rating is "
                     "among that user's support ratings (negative under <10%: more weight on each user's rare "
                     "ratings would help).", "", *by_share]
    if predictions is not None:
        text += ["", "## Paired differences per user, 95% bootstrap intervals", "",
                 f"MELO − other on the same test users (negative: MELO's error is lower); percentile interval of "
                 f"{config.bootstrap} resamples of the test users (seed {config.bootstrap_seed}). Over several "
                 "seeds: the mean of the seeds' differences with a t interval over the seeds, and the difference "
                 "of all seeds' test users pooled, with a bootstrap interval drawing users within each seed, and "
                 "the smallest difference that interval resolves (its half width).", "",
                 *paired_table(config, predictions, summary)]
    text += beyond_biases(config, reports, predictions, validation, summary["beyond_biases"])
    return "\n".join(text) + "\n", summary


def fold_in_figures(config, reports, store):
    """The table of how far the user + item bias fold-in's RMSE is from each neural method's, in percent of
    the method's (negative: the fold-in is better): the figures the real MovieLens-100K gave (issue 21;
    docs/comparison.md), to check a generator against."""
    fold_in = [r["rmse"] for r in reports[(None, FOLD_IN)]]
    header = "| Fold-in vs | " + " | ".join(display(m) for m in config.models) + " |"
    lines = ["", "### The fold-in against each method", "",
             f"{METHOD_NAMES[FOLD_IN]} RMSE against each method's, (fold-in − method) / method, mean ± std "
             "over seeds (negative: the fold-in is better):", "", header, "|---|" + "---:|" * len(config.models)]
    for method in methods(config):
        row = [method_label(config, method)]
        for model in config.models:
            own = [r["rmse"] for r in reports[(model, method)]]
            percent = [None if p is None else -p for p in reduction(fold_in, own)]
            store.setdefault("fold_in_vs_percent", {}).setdefault(model, {})[method] = summary_of(percent)
            row.append(cell(percent, percent=True, seeds=len(own)))
        lines.append("| " + " | ".join(row) + " |")
    return lines


def beyond_biases(config, reports, predictions, validation, store):
    """The markdown section on what a network adds beyond the biases (filling `store`): each meta-learner −
    the best no-network baseline, paired per user, and each neural method's blend with the fold-in."""
    models, lines = config.models, []
    if predictions is not None:
        chosen = [best_no_network(reports, index) for index in range(len(config.seeds))]
        store["best_no_network"] = [{"seed": seed.label, "baseline": name, "scores": scores, "by": rule}
                                    for seed, (name, scores, rule) in zip(config.seeds, chosen)]
        select_by = reports[(None, FOLD_IN)][0]["selection"]["select_by"]
        rule_text = {
            CROSS_FITTED: f"cross-fitted validation {select_by} (the validation users in 10 folds, or one each "
                          "when fewer, each predicted at the setting chosen on the rest)",
            GRID_MINIMUM: f"validation {select_by} at each grid's minimum (reports from before the cross-fitted "
                          "score)"}
        rules = list(dict.fromkeys(rule for _, _, rule in chosen))
        per_seed = [f"{seed.label}: {METHOD_NAMES[name]} ({', '.join(f'{v:.4f}' for v in scores.values())})"
                    + (f" ({rule})" if len(rules) > 1 else "")
                    for seed, (name, scores, rule) in zip(config.seeds, chosen)]
        lines += ["", "## What the network adds beyond the biases", "",
                  f"Best no-network baseline: the better of {' and '.join(METHOD_NAMES[n] for n in NO_NETWORK)} "
                  f"by {' or '.join(rule_text[rule] for rule in rules)}, per seed (the scores: "
                  f"{', '.join(METHOD_NAMES[n] for n in NO_NETWORK)}): " + "; ".join(per_seed)
                  + ". Meta-learner − that baseline, "
                  f"− {METHOD_NAMES[FOLD_IN]}, − {METHOD_NAMES[RECALIBRATED]} and − {METHOD_NAMES[FOLD_IN_BLEND]} in "
                  "every seed, on the same test "
                  "users (negative: the network's error is lower), intervals as above.", "",
                  "| Difference | " + " | ".join(f"{display(m)} RMSE | {display(m)} mean per-rating RMSE"
                                                for m in models) + " |", "|---|" + "---:|---:|" * len(models)]
        against = [("best no-network", "best_no_network", [name for name, _, _ in chosen]),
                   (METHOD_NAMES[FOLD_IN], FOLD_IN, [FOLD_IN] * len(chosen)),
                   (METHOD_NAMES[RECALIBRATED], RECALIBRATED, [RECALIBRATED] * len(chosen)),
                   (METHOD_NAMES[FOLD_IN_BLEND], FOLD_IN_BLEND, [FOLD_IN_BLEND] * len(chosen))]
        for label, key_name, compared_with in against:
            for method in ("maml", "melo"):
                row = [f"{METHOD_NAMES[method]} − {label}"]
                for model in models:
                    pairs = [(mine, predictions[(None, name)][index])
                             for index, (mine, name) in enumerate(zip(predictions[(model, method)], compared_with))]
                    results = [paired_difference(mine, theirs, config.bootstrap, config.bootstrap_seed)
                               for mine, theirs in pairs]
                    pooled = (pooled_difference(pairs, config.bootstrap, config.bootstrap_seed) if len(pairs) > 1
                              else None)
                    for key in ("rmse", "mean_per_rating_rmse"):
                        per_seed = [r[key] for r in results]
                        row.append(paired_cell(per_seed, pooled and pooled[key]))
                        differences = [r["difference"] for r in per_seed]
                        over_seeds = metrics.seed_interval(differences)
                        store.setdefault("paired", {}).setdefault(model, {}).setdefault(
                            f"{method}_minus_{key_name}", {})[key] = {
                            **summary_of(differences), "intervals": per_seed,
                            "seed_interval": None if over_seeds is None else list(over_seeds[1:]),
                            "pooled": pooled and pooled[key]}
                lines.append("| " + " | ".join(row) + " |")
    lines += fold_in_figures(config, reports, store)
    if validation is not None and predictions is not None:
        rows, missing = [], False
        fold_in = [r["rmse"] for r in reports[(None, FOLD_IN)]]
        for model in models:
            for method in methods(config):  # (read_predictions holds every neural method's test targets)
                tests = zip(validation[(model, method)], validation[(None, FOLD_IN)], predictions[(model, method)],
                            predictions[(None, FOLD_IN)])
                per_seed = [None if mine is None or theirs is None else blend(mine, theirs, mine_test, their_test)
                            for mine, theirs, mine_test, their_test in tests]
                missing = missing or None in per_seed
                own = [r["rmse"] for r in reports[(model, method)]]
                blended, weights = [r and r["rmse"] for r in per_seed], [r and r["w"] for r in per_seed]
                store.setdefault("blend", {}).setdefault(model, {})[method] = {
                    "w": summary_of(weights), "rmse": summary_of(blended), "method_rmse": summary_of(own),
                    "fold_in_rmse": summary_of(fold_in), "vs_fold_in_percent": summary_of(reduction(blended, fold_in))}
                row = [display(model), f"{method_label(config, method)} + fold-in", cell(own), cell(fold_in),
                       cell(weights, seeds=len(per_seed)), cell(blended, seeds=len(per_seed)),
                       cell(reduction(blended, fold_in), percent=True)]
                rows.append("| " + " | ".join(row) + " |")
        lines += ["", f"Blend w · {METHOD_NAMES[FOLD_IN]} + (1 − w) · method, w in 0, 0.05, ..., 1 chosen by the "
                  "per-window RMSE on the validation users, scored on the test users (w = 1: the network adds "
                  "nothing the fold-in does not have; blend vs fold-in: the error reduction, positive when the "
                  "blend is better)." + (" A cell with – or n= lacks seeds whose reports predate the validation "
                                         "predictions (remove those reports to test them again)." if missing else ""),
                  "", "| Backbone | Blend | method RMSE | fold-in RMSE | w | blend RMSE | blend vs fold-in |",
                  "|---|---|---:|---:|---:|---:|---:|", *rows]
    return lines

"""The ordinal grader as a task kind: k fold timm models with K-1 cumulative outputs, scored by QWK.

The diabetic-retinopathy recipe, made the default: a grade g is the K-1 targets "grade >= k"
(BCE, one sigmoid per step; :mod:`..ordinal`); the kept epoch is the one with the best validation
QWK; each fold model's grade thresholds are chosen on its own validation fold -- the images it
never trained on -- for the best QWK and saved in its checkpoint next to the preprocessing, and
prediction reads them (a checkpoint without them is refused: nothing falls back to rounding at
0.5). Prediction gives the cumulative probabilities (flip-TTA averaged), the expected grade and
the thresholded grade. Class-weighted sampling is an option (``grader.sampling``).

Noisy student on grades, with the lineage rules of the classifier: the pseudo labels of student
fold k are teacher fold k's cumulative probabilities (soft targets), thresholds and the margin
rule read on the OTHER folds' OOF predictions; the confidence of a pseudo grade is its expected
grade's distance from the nearest threshold; selection, balancing and the starving-grade fallback
are per grade (``pseudo.*`` applies to grades as to classes). Generation OOF grades are cut with
cross-fitted thresholds (fold k's from the other folds' OOF), so OOF QWK is honest; the pool and
test are cut with the ensemble's thresholds (from all OOF).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from ...augment.transforms import student_transform, teacher_transform
from ...datasets.atomic import read_json, read_table, write_json, write_table
from ...datasets.config import config_to_dict, fingerprint
from ...datasets.errors import ConfigError, DataError
from ...datasets.grades import GRADE, GradeSource, grades_of
from ...datasets.table import ItemTable
from ...datasets.torch_data import ClassificationDataset
from ...loops.checkpoint import CheckpointError, preprocess_from_meta, save_checkpoint
from ...loops.crossfit import FoldPlan
from ...loops.metrics import quadratic_weighted_kappa
from ...loops.predict import predict_probs
from ...loops.train import fit
from .. import ordinal, pseudo
from ..config import EngineConfig, ladder_value, matched_epochs
from ..fusion import MODEL_SEPARATOR
from ..layout import (CHECKPOINT, GRADE_PSEUDO, GRADE_PSEUDO_INFO, GRADE_SELECTION, GRADE_THRESHOLDS, GRADER, HISTORY,
                      LABELED_FOLDS, OOF, POOL, POOL_FOLDS, cumulative_columns, fold_of_model, pseudo_fold_dir)
from ..models import create_classifier, load_classifier
from .base import Task, assert_fold_lineage, fold_seed, of_fold, seed_everything, student_totals, warn_starving
from .classifier import TrainingSet

log = logging.getLogger("cxr.cycle")


def grade_source(cfg: EngineConfig, *, hidden: bool = False) -> GradeSource | None:
    """Where this run's grades are read (None when the grader is not in ``run.tasks``); ``hidden``:
    the pool's true grades, which only the demo has (``unlabeled_grades.csv``)."""
    from ...datasets.demo import GRADES_CSV, UNLABELED_GRADES_CSV

    g, data = cfg.grader, cfg.data
    if GRADER not in cfg.run.tasks:
        return None
    if hidden:
        found = data.format == "demo" and (Path(data.root) / UNLABELED_GRADES_CSV).is_file()
        return GradeSource(UNLABELED_GRADES_CSV, "grade", g.num_grades) if found else None
    csv = g.grades_csv or {"demo": GRADES_CSV, "generic": data.images_csv}.get(data.format, "")
    if not csv:
        raise ConfigError(f"grader.grades_csv: the {data.format} format has no grade column of its own; name the "
                          "CSV (image_id + grader.grade_column) that holds the grades")
    column = "grade" if data.format == "demo" and not g.grades_csv else g.grade_column
    return GradeSource(csv, column, g.num_grades, g.grade_rounding,
                       report_absent=not (data.format == "generic" and csv == data.images_csv))


@dataclass(frozen=True)
class GradeTrainingSet(TrainingSet):
    """The classifier's training set with cumulative targets and each sample's grade (what
    class-weighted sampling draws by; not part of the fingerprint, which the targets already fix)."""

    grades: np.ndarray = field(default_factory=lambda: np.zeros(0))


class GraderTask(Task):
    name = GRADER

    @property
    def num_grades(self) -> int:
        return self.cfg.grader.num_grades

    @property
    def columns(self) -> list[str]:
        return cumulative_columns(self.num_grades)

    # ------------------------------------------------------------------ which images
    def enabled(self) -> bool:
        if GRADE in self.table.items and self.labeled_ids():
            return True
        log.warning("grader: no labeled image has a grade (see data/quarantine.csv and grader.grades_csv / "
                    "grader.grade_column); the grader is skipped")
        return False

    def labeled_ids(self) -> list[str]:
        """Labeled images with a known grade, in fold-table order."""
        graded = graded_ids(self.table)
        return [i for i in self.ctx.folds.index if i in graded]

    def pool_ids(self) -> list[str]:
        """Unlabeled and test images, and labeled images without a grade (the shared set grades 61 of 251)."""
        items = self.ctx.table.items
        return self.images_without(items["image_id"].isin(graded_ids(self.ctx.table)))

    def every_fold_ids(self) -> list[str]:
        """The pool and the labeled images: a student fold blends its targets with its own teacher fold's."""
        return self.pool_ids() + self.labeled_ids()

    def model_name(self, gen: int) -> str:
        return ladder_value(self.cfg.grader.ladder, gen)

    def student_steps(self) -> float:
        return self.cfg.grader.student_steps

    # ------------------------------------------------------------------ plans
    def payload(self, gen: int) -> dict:
        """Generation ``gen``'s own rung and training settings (as ClassifierTask.payload): how
        pseudo grades are chosen reaches a student through its training set's fingerprint, so a
        change to the students' recipe never retrains the teacher."""
        cfg, gc = self.cfg, self.cfg.grader
        return {"model": self.model_name(gen), "num_grades": gc.num_grades, "pretrained": gc.pretrained,
                "drop_rate": ladder_value(gc.drop_rate, gen), "drop_path_rate": ladder_value(gc.drop_path_rate, gen),
                "randaugment": [ladder_value(cfg.augment.randaugment_n, gen), ladder_value(cfg.augment.randaugment_m, gen)],
                "tta_hflip": cfg.augment.tta_hflip, "sampling": gc.sampling, "grade_weights": list(gc.grade_weights),
                "selection_metric": gc.selection_metric, "train": config_to_dict(gc.train),
                "pre": config_to_dict(cfg.preprocess), "seed": cfg.run.seed, "gen": gen}

    def fold_plans(self, gen: int, pseudo_dir: Path | None, teacher: Path | None, extra_ids: Sequence[str] = (),
                   *, steps_factor: float | None = None, patience: int = 0) -> list[FoldPlan]:
        """Fold k: the other folds' graded images (targets blended with teacher fold k's soft ones
        from cycle 1 on) + the pseudo grades chosen for fold k (see ClassifierTask.fold_plans)."""
        labeled = read_table(teacher / LABELED_FOLDS) if teacher else None
        pool = read_table(teacher / POOL_FOLDS) if teacher and (teacher / POOL_FOLDS).exists() else None
        folds, plans = self.ctx.folds, []
        for fold in range(self.cfg.folds.k):
            train_ids = [i for i in self.labeled_ids() if folds[i] != fold] + list(extra_ids)
            val_ids = [i for i in self.labeled_ids() if folds[i] == fold]
            if not val_ids:
                raise DataError(f"grader fold {fold} has no graded image: its thresholds cannot be chosen out of fold "
                                "(fewer folds.k, or more graded images)")
            selected = None
            if pseudo_dir is not None:
                where = pseudo_fold_dir(pseudo_dir, fold)
                selected = read_table(where / GRADE_PSEUDO)
                assert_fold_lineage(fold, selected["models"], read_json(where / GRADE_PSEUDO_INFO)["threshold_oof_folds"],
                                    where=where)
            ts = self.student_targets(train_ids, of_fold(labeled, fold), selected, of_fold(pool, fold), gen)
            epochs = matched_epochs(self.cfg.grader.train.epochs, len(train_ids) - len(extra_ids), len(ts.image_ids),
                                    self.steps_factor(gen, steps_factor))
            plans.append(FoldPlan(fold, ts, tuple(ts.image_ids), tuple(val_ids), epochs,
                                  {"train": fingerprint(ts.fingerprint_payload()),
                                   "sources": f"f{fold}" if teacher else None}, patience=patience))
        return plans

    def student_targets(self, labeled_ids: list[str], soft: pd.DataFrame | None, pseudo_rows: pd.DataFrame | None,
                        pool_probs: pd.DataFrame | None, gen: int) -> GradeTrainingSet:
        """Cumulative targets of one fold's images from the stored raw probabilities: ground truth
        (blended with the teacher fold's OOF-free soft label), then the pseudo grades (soft: the
        teacher fold's cumulative probabilities, sharpened by ``pseudo.temperature``; hard: the
        thresholded grade's steps)."""
        pc, k, cols = self.cfg.pseudo, self.num_grades, self.columns
        grades = grades_of(self.table, labeled_ids)
        gt = ordinal.cumulative_targets(grades, num_grades=k)
        if soft is not None and pc.labeled_blend > 0:
            gt = pseudo.blend_targets(gt, soft.set_index("image_id").loc[labeled_ids, cols].to_numpy(),
                                      weight=pc.labeled_blend)
        ids, targets, weights, sample_grades = list(labeled_ids), [gt], [np.ones(len(gt), np.float32)], [grades]
        if pseudo_rows is not None and len(pseudo_rows):
            pseudo_grades = pseudo_rows["class_index"].to_numpy(int)
            if pc.mode == "hard":
                soft_t = ordinal.cumulative_targets(pseudo_grades, num_grades=k)
            else:
                probs = pool_probs.set_index("image_id").loc[pseudo_rows["image_id"], cols].to_numpy()
                soft_t = pseudo.sharpen(probs, temperature=pc.temperature, mode="multilabel")
            repeats = pseudo_rows["copies"].to_numpy(int)
            ids += list(np.repeat(pseudo_rows["image_id"].to_numpy(), repeats))
            targets.append(np.repeat(soft_t, repeats, axis=0))
            weights.append(np.full(int(repeats.sum()), pc.weight, np.float32))
            sample_grades.append(np.repeat(pseudo_grades, repeats))
        return GradeTrainingSet(ids, np.concatenate(targets).astype(np.float32), np.concatenate(weights), gen,
                                grades=np.concatenate(sample_grades).astype(int))

    # ------------------------------------------------------------------ one fold
    def fit_fold(self, plan: FoldPlan, out_dir: Path) -> dict:
        """Train one fold grader, choose its thresholds on its validation fold, save both."""
        cfg, gc, pp, k = self.cfg, self.cfg.grader, self.cfg.preprocess, self.num_grades
        train, gen = plan.train, plan.train.generation
        name = self.model_name(gen)
        drop, drop_path = ladder_value(gc.drop_rate, gen), ladder_value(gc.drop_path_rate, gen)
        n, m = ladder_value(cfg.augment.randaugment_n, gen), ladder_value(cfg.augment.randaugment_m, gen)
        seed = fold_seed(cfg.run.seed, gen, plan.fold)
        seed_everything(seed)
        model = create_classifier(name, k - 1, drop_rate=drop, drop_path_rate=drop_path, pretrained=gc.pretrained)
        transform = student_transform(pp.size, n, m) if n > 0 else teacher_transform(pp.size)
        load = self.ctx.loader()
        train_ds = ClassificationDataset(load, train.image_ids, train.targets, train.weights, transform, pp.mean, pp.std)
        val_grades = grades_of(self.table, plan.val_ids)
        val_ds = ClassificationDataset(load, list(plan.val_ids), ordinal.cumulative_targets(val_grades, num_grades=k),
                                       None, None, pp.mean, pp.std)
        train_cfg = replace(gc.train, epochs=plan.epochs, patience=plan.patience or gc.train.patience)
        result = fit(model, train_ds, val_ds, train_cfg, loss="bce",
                     metric_fn=validation_qwk(k) if gc.selection_metric == "qwk" else None, device=self.ctx.device,
                     seed=seed, log=log.info, name=f"{GRADER} gen {gen} fold {plan.fold}",
                     sampler_weights=ordinal.sampling_weights(train.grades, num_grades=k, rule=gc.sampling,
                                                              given=gc.grade_weights))
        scores = ordinal.expected_grade(predict_probs(model, val_ds, device=self.ctx.device,
                                                      batch_size=gc.train.batch_size,
                                                      tta_hflip=cfg.augment.tta_hflip, activation="sigmoid"))
        thresholds = ordinal.fit_thresholds(val_grades, scores, num_grades=k)
        meta = {
            "model_name": name, "num_classes": k - 1, "class_names": [c.split(":", 1)[1] for c in self.columns],
            "drop_rate": drop, "drop_path_rate": drop_path, "preprocess": config_to_dict(pp), "activation": "sigmoid",
            "task": GRADER, "num_grades": k, "ordinal_thresholds": thresholds.tolist(),
            "thresholds_from": f"fold {plan.fold}'s {len(val_grades)} validation images (out of fold for this model)",
            "generation": gen, "fold": plan.fold, "randaugment": [n, m], "epochs": plan.epochs,
            "config": config_to_dict(cfg),
        }
        save_checkpoint(out_dir / CHECKPOINT, model, meta)
        write_json(out_dir / HISTORY, {"history": result.history, "best_metric": result.best_metric,
                                       "epochs_run": result.epochs_run, "thresholds": thresholds.tolist()})
        return {"best_metric": result.best_metric, "epochs_run": result.epochs_run, "model": name,
                "train_images": len(set(train.image_ids)), "train_samples": len(train.image_ids),
                "thresholds": thresholds.tolist()}

    # ------------------------------------------------------------------ prediction
    def predict(self, fold_dir: Path, fold: int, image_ids: Sequence[str]) -> pd.DataFrame:
        """Cumulative probabilities (flip-TTA averaged), the expected grade and the grade cut by the
        checkpoint's own thresholds, read through the cache of the checkpoint's preprocessing."""
        model, meta = load_classifier(fold_dir / CHECKPOINT, self.ctx.device)
        thresholds = stored_thresholds(meta, fold_dir / CHECKPOINT, self.num_grades)
        pp, ids = meta["preprocess"], list(image_ids)
        ds = ClassificationDataset(self.ctx.loader(preprocess_from_meta(meta)), ids,
                                   np.zeros((len(ids), len(self.columns)), np.float32), None, None, pp["mean"], pp["std"])
        probs = predict_probs(model, ds, device=self.ctx.device, batch_size=self.cfg.grader.train.batch_size,
                              tta_hflip=self.cfg.augment.tta_hflip, activation="sigmoid")
        scores = ordinal.expected_grade(probs)
        return pd.DataFrame(probs, columns=self.columns).assign(
            expected=scores, grade=ordinal.threshold_grades(scores, thresholds=thresholds), image_id=ids)

    def write_predictions(self, oof: pd.DataFrame, every: pd.DataFrame, out_dir: Path) -> dict:
        """oof.csv (grades cut by cross-fitted thresholds: fold k's from the other folds' OOF),
        labeled_folds.csv, pool_folds.csv (each fold model's own thresholds), pool.csv (the fold
        ensemble's mean probabilities, cut by thresholds from all OOF; ``agreement``: the share
        of fold models giving the same grade) and thresholds.json."""
        k, cols = self.num_grades, ["image_id", "fold", *self.columns, "expected", "grade"]
        oof = oof.reset_index(drop=True)
        truth = grades_of(self.table, oof["image_id"])
        cross = {}
        for fold in sorted(oof["fold"].unique()):
            mine = (oof["fold"] == fold).to_numpy()
            cross[int(fold)] = ordinal.fit_thresholds(truth[~mine], oof.loc[~mine, "expected"], num_grades=k)
            oof.loc[mine, "grade"] = ordinal.threshold_grades(oof.loc[mine, "expected"], thresholds=cross[int(fold)])
        oof["grade"] = oof["grade"].astype(int)
        ensemble = ordinal.fit_thresholds(truth, oof["expected"], num_grades=k)
        write_table(out_dir / OOF, oof[cols])
        labeled = every["image_id"].isin(set(self.labeled_ids()))
        write_table(out_dir / LABELED_FOLDS, every[labeled][cols])
        pool = every[~labeled]
        if len(pool):
            write_table(out_dir / POOL_FOLDS, pool[cols])
            write_table(out_dir / POOL, ensemble_table(pool, self.columns, ensemble))
        write_json(out_dir / GRADE_THRESHOLDS, {
            "ensemble": ensemble.tolist(), "cross_fitted": {str(f): t.tolist() for f, t in cross.items()},
            "fitted_on": "OOF predictions against the true grades (QWK), never the pool or the test part"})
        return {"oof_images": len(oof), "pool_images": int(pool["image_id"].nunique()) if len(pool) else 0,
                "thresholds": ensemble.tolist()}

    # ------------------------------------------------------------------ pseudo grades
    def select(self, teachers: dict[str, Path], out_dir: Path, cycle: int) -> dict:
        """The ensemble's pseudo grades (report, exports) and, per fold k, the ones student fold k
        trains on: teacher fold k's probabilities, thresholds and margins from the other folds' OOF.

        A pool image that belongs to fold k itself (a labeled image without a grade: its patient
        and duplicate group are fold k's) is left out of fold k's pseudo grades, so that student
        fold k trains on no image of the fold it is scored on -- not even an ungraded copy of a
        graded one (the shared set has such copies)."""
        pred_dir, k = teachers[GRADER], self.cfg.folds.k
        oof = read_table(pred_dir / OOF)
        test = set(self.ctx.ids("test"))
        pool_ids = set(i for i in self.pool_ids() if i not in test)
        empty = pd.DataFrame(columns=["image_id", "fold", *self.columns])
        pool = read_table(pred_dir / POOL) if (pred_dir / POOL).exists() else empty.drop(columns="fold")
        per_fold = read_table(pred_dir / POOL_FOLDS) if (pred_dir / POOL_FOLDS).exists() else empty
        info = self.select_set(pool[pool["image_id"].isin(pool_ids)], oof, out_dir, cycle=cycle,
                               models=[f"f{f}" for f in range(k)], oof_folds=list(range(k)))
        info["folds"] = {}
        folds = self.ctx.folds
        for fold in range(k):
            others = [f for f in range(k) if f != fold]
            usable = {i for i in pool_ids if folds.get(i, -1) != fold}
            info["folds"][str(fold)] = self.select_set(of_fold(per_fold[per_fold["image_id"].isin(usable)], fold),
                                                       oof[oof["fold"].isin(others)], pseudo_fold_dir(out_dir, fold),
                                                       cycle=cycle, models=[f"f{fold}"], oof_folds=others)
        info["students"] = student_totals(list(info["folds"].values()), count_key="kept_per_grade")
        return info

    def select_set(self, probs: pd.DataFrame, oof: pd.DataFrame, out_dir: Path, *, cycle: int, models: list[str],
                   oof_folds: list[int]) -> dict:
        """One selection: grade thresholds and margins on ``oof``, starving grades flagged and given
        the fallback, per-grade balancing, provenance."""
        gc, pc, k = self.cfg.grader, self.cfg.pseudo, self.num_grades
        truth, scores = grades_of(self.table, oof["image_id"]), oof["expected"].to_numpy(np.float64)
        thresholds = ordinal.fit_thresholds(truth, scores, num_grades=k)
        margins = (ordinal.margin_thresholds(scores, truth, thresholds=thresholds, num_grades=k,
                                             target_accuracy=gc.target_accuracy)
                   if gc.target_accuracy > 0 else np.full(k, gc.min_margin))
        cum = probs[self.columns].to_numpy(np.float64).reshape(-1, k - 1)
        selection = ordinal.select_grades(probs["image_id"].tolist(), cum, thresholds=thresholds, min_margin=margins)
        selection["rule"] = np.where(selection["kept"], "margin", "")
        support = np.bincount(ordinal.threshold_grades(scores, thresholds=thresholds), minlength=k)
        starving = pseudo.starving_classes(selection, support, num_classes=k,
                                           min_support=pc.min_oof_support if gc.target_accuracy > 0 else 0)
        if starving and pc.fallback == "top_k" and len(selection):
            size = pseudo.fallback_size(selection, list(starving), fixed=pc.fallback_k)
            selection = pseudo.top_k_fallback(selection, list(starving), k=size)
        balanced = (pseudo.balance_classes(selection, per_class=pc.per_class, seed=self.cfg.run.seed)
                    if pc.balance else selection[selection["kept"]].assign(copies=1))
        provenance = {"cycle": cycle, "source": f"gen{cycle - 1}/{GRADER}",
                      "folds": "|".join(str(fold_of_model(m)) for m in models), "models": MODEL_SEPARATOR.join(models)}
        write_table(out_dir / GRADE_SELECTION, selection.assign(**provenance))
        write_table(out_dir / GRADE_PSEUDO, balanced.assign(**provenance))
        kept = selection[selection["kept"]]
        names = [ordinal.grade_label(g) for g in range(k)]
        info = {"unlabeled": len(selection), "kept": int(len(kept)),
                "after_balance": int(balanced["copies"].sum()) if len(balanced) else 0,
                "kept_per_grade": {n: int((kept["label"] == n).sum()) for n in names if (kept["label"] == n).any()},
                "thresholds": thresholds.tolist(), "margins": [None if np.isinf(v) else float(v) for v in margins],
                "support": dict(zip(names, support.tolist())), "threshold_oof_folds": oof_folds, "models": models,
                "starving": {names[g]: why for g, why in starving.items()},
                "fallback": {names[g]: int(((kept["class_index"] == g) & (kept["rule"] == "top_k")).sum())
                             for g in starving} if starving and pc.fallback == "top_k" else {},
                "fallback_mode": pc.fallback,
                **truth_agreement(kept, self.ctx.truth, names)}
        warn_starving(GRADER, models, info, kept=info["kept_per_grade"])
        write_json(out_dir / GRADE_PSEUDO_INFO, info)
        return info

    # ------------------------------------------------------------------ scores
    def score(self, pred_dir: Path) -> dict:
        """QWK and friends: OOF (cross-fitted thresholds), the held-out test part and the pool's
        hidden truth (ensemble thresholds), plus the ensemble's thresholds."""
        out = {"oof": self.evaluate(read_table(pred_dir / OOF), self.table),
               "thresholds": read_json(pred_dir / GRADE_THRESHOLDS)["ensemble"]}
        if (pred_dir / POOL).exists():
            pool = read_table(pred_dir / POOL)
            out["test"] = self.evaluate(pool[pool["image_id"].isin(self.ctx.ids("test"))], self.table)
            if self.ctx.truth is not None:
                out["unlabeled_truth"] = self.evaluate(pool[pool["image_id"].isin(self.ctx.ids("unlabeled"))],
                                                       self.ctx.truth)
        return out

    def evaluate(self, rows: pd.DataFrame, source: ItemTable) -> dict | None:
        """ordinal_metrics of the rows whose grade ``source`` knows (None when none is known)."""
        rows = rows[rows["image_id"].isin(graded_ids(source))]
        if rows.empty:
            return None
        return ordinal.ordinal_metrics(grades_of(source, rows["image_id"]), rows["expected"].to_numpy(np.float64),
                                       predicted=rows["grade"].to_numpy(int), num_grades=self.num_grades)


def graded_ids(table: ItemTable) -> set[str]:
    """Images whose grade the table knows."""
    items = table.items
    return set(items.loc[items[GRADE].notna(), "image_id"]) if GRADE in items else set()


def validation_qwk(num_grades: int):
    """Checkpoint selection by validation QWK: the expected grade rounded (the thresholds are
    fitted after training, on the same fold, so they cannot pick the epoch without peeking)."""
    cuts = ordinal.rounding_thresholds(num_grades)

    def metric(y_true: np.ndarray, probs: np.ndarray) -> float:
        truth = np.rint(np.asarray(y_true).sum(axis=1)).astype(int)
        return quadratic_weighted_kappa(truth, ordinal.threshold_grades(np.asarray(probs).sum(axis=1), thresholds=cuts))

    return metric


def stored_thresholds(meta: dict, path: Path, num_grades: int) -> np.ndarray:
    """The checkpoint's OOF-chosen thresholds; a checkpoint without them (or for another scale) is
    refused rather than graded by rounding."""
    thresholds = meta.get("ordinal_thresholds")
    if not isinstance(thresholds, list) or len(thresholds) != num_grades - 1:
        raise CheckpointError(f"{path}: no ordinal thresholds for {num_grades} grades in the checkpoint meta "
                              f"(found {thresholds!r}); it is not a grader checkpoint of this scale")
    return np.asarray(thresholds, np.float64)


def ensemble_table(per_fold: pd.DataFrame, columns: list[str], thresholds: np.ndarray) -> pd.DataFrame:
    """The fold ensemble on the pool: mean cumulative probabilities, expected grade, grade (cut by
    ``thresholds``) and the share of fold models whose own grade agrees."""
    mean = per_fold.groupby("image_id", sort=True)[columns].mean()
    scores = ordinal.expected_grade(mean.to_numpy())
    grade = ordinal.threshold_grades(scores, thresholds=thresholds)
    by_model = per_fold.pivot(index="image_id", columns="fold", values="grade").loc[mean.index]
    return mean.reset_index().assign(expected=scores, grade=grade,
                                     agreement=ordinal.agreement(by_model.to_numpy().T, grade))


def truth_agreement(kept: pd.DataFrame, truth: ItemTable | None, names: list[str]) -> dict:
    """Kept pseudo grades against the pool's hidden truth (measuring only): exact (precision) and
    within one grade, overall and per grade; None / {} without truth."""
    known = kept[kept["image_id"].isin(graded_ids(truth))] if truth is not None else kept.iloc[:0]
    if known.empty:
        return {"precision": None, "within_one": None, "precision_per_grade": {}}
    true = grades_of(truth, known["image_id"])
    pred = known["class_index"].to_numpy(int)
    return {"precision": float((true == pred).mean()), "within_one": float((np.abs(true - pred) <= 1).mean()),
            "precision_per_grade": {names[g]: float((true[pred == g] == g).mean()) for g in np.unique(pred)}}

"""A linear probe over utterance features with speaker-independent folds: does a feature set carry emotion?

Standardised features, multinomial logistic regression (scikit-learn), `StratifiedGroupKFold` with the
speaker as the group: no speaker is in both the training and the scored part of a fold, and each fold keeps
the class mix as far as whole speakers allow. Accuracy and balanced accuracy (unweighted average recall, the
usual speech-emotion figure) per fold, then their mean and standard deviation over the folds.

Memory: `features` may be memory-mapped; a fold holds its gathered rows (float32, standardised in place) and the
float64 copy of its training rows that scikit-learn's lbfgs solver makes (which it needs: converting them first
would change the scaler's float32 arithmetic, so the numbers).
"""

from __future__ import annotations

import warnings

import numpy as np


def speaker_independent_probe(features: np.ndarray, labels: np.ndarray, speakers, *, folds: int = 5, C: float = 1.0,
                              seed: int = 0) -> dict:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, balanced_accuracy_score
    from sklearn.model_selection import StratifiedGroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    speakers = np.asarray(speakers)
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    accuracy, balanced = [], []
    for train, test in splitter.split(features, labels, groups=speakers):
        assert not set(speakers[train]) & set(speakers[test])
        # The fold's rows are gathered into a fresh array, so the scaler standardises that in place (copy=False:
        # the same arithmetic, one copy fewer). What stays: the gathered fold and lbfgs's float64 copy of it.
        probe = make_pipeline(StandardScaler(copy=False), LogisticRegression(C=C, max_iter=3000))
        probe.fit(np.asarray(features[train]), labels[train])
        predicted = probe.predict(np.asarray(features[test]))
        accuracy.append(accuracy_score(labels[test], predicted))
        with warnings.catch_warnings():
            # A fold of whole speakers may lack a class: its recall is left out of the average (sklearn says so
            # once per fold, which is expected here, not news).
            warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
            balanced.append(balanced_accuracy_score(labels[test], predicted))
    return {"accuracy_mean": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy)),
            "balanced_accuracy_mean": float(np.mean(balanced)), "balanced_accuracy_std": float(np.std(balanced)),
            "accuracy_per_fold": [float(a) for a in accuracy], "folds": folds, "dim": int(features.shape[1]),
            "chance": float(1.0 / len(np.unique(labels)))}

"""What the runs say: the leaderboard with its intervals and paired tests (`leaderboard`, `stats`), the report page
(`report`, with `robustness` to a missing modality and the models' `gates`), the gap from each paper's figure to the
leaderboard (`gap`), a trained model on new inputs (`inference`), and the probes of the features (`leakage` of
labels into validation, `probe`: does an audio set carry emotion)."""

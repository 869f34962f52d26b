"""Every logged erc model as an MLflow pyfunc (the MLmodel file `erc.tracking.pyfunc_flavor` writes), served with

    MLFLOW_TRACKING_URI=sqlite:///mlflow.db mlflow models serve -m models:/erc-iemocap-mister_e-tuned@best \\
        --env-manager local -h 127.0.0.1 -p 5001
    curl -s 127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\
        -d '{"dataframe_records": [{"speaker": "A", "text": "You never asked me."}]}'

A request is a conversation with the columns `erc predict` reads from a file (`speaker`, `text`, optionally
`dialogue_id` and `<modality>_features` as lists of numbers); the answer is `erc predict --json`'s records, one
per utterance: its emotion, probabilities {label: p} and gates {gate: {expert: w}}, computed by the same code.
A bad request is answered 400 with erc's one-line message.
"""

from __future__ import annotations


import pandas as pd

from erc.errors import ErcDataError
from erc.models.checkpoint import LoadedModel, load_logged
from erc.serving.predict import conversation_table, predict_table, text_encoder, to_json

REQUEST = "request"  # how a served conversation is named in messages


class ErcPyfunc:
    """predict(conversation) -> one record per utterance, as `erc predict --json` writes them."""

    def __init__(self, loaded: LoadedModel):
        self.loaded = loaded
        self.encoder = None  # the text encoder, loaded by the first request that needs it and kept

    def predict(self, model_input, params=None) -> list[dict]:
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
            table = conversation_table(frame.reset_index(drop=True), REQUEST)
            self.encoder = self.encoder or text_encoder(table, self.loaded)
            out = predict_table(table, REQUEST, self.loaded, encoder=self.encoder)
        except ErcDataError as e:  # the caller's mistake: a 400 with erc's message, not a 500 and a traceback
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        return to_json(out, self.loaded.info["labels"])


def _load_pyfunc(path) -> ErcPyfunc:
    return ErcPyfunc(load_logged(path))

"""The MLflow model of every registered version, in MLflow's models-from-code form: MLflow stores this file's
source (not a pickle) and runs it when the model is loaded; ``load_context`` then loads the Hugging Face folder
stored beside it as the artifact ``checkpoint``.

    model = mlflow.pyfunc.load_model("models:/tvp-grounding@champion")
    model.predict(pd.DataFrame({"video": ["s3://videos/a.mp4"], "sentence": ["a person opens the door"]}))

What goes in and comes out: ``tvlt_core.serving.predict``. A bad row raises ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` (HTTP 400 from ``mlflow models serve``), naming the row and the reason.
"""

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from tvlt_core.serving.export import CHECKPOINT_ARTIFACT


class RegisteredModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        from tvlt_core.serving.predict import load_predictor

        self.predictor = load_predictor(context.artifacts[CHECKPOINT_ARTIFACT])

    def predict(self, context, model_input, params=None):
        from tvlt_core.serving.predict import InputError

        try:
            return self.predictor.predict(model_input)
        except InputError as err:
            raise MlflowException(str(err), error_code=INVALID_PARAMETER_VALUE) from None


mlflow.models.set_model(RegisteredModel())

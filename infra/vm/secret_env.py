"""Print ``export KEY=VALUE`` lines for a JSON secret in AWS Secrets Manager, for a Ray node's start command.

    eval "$(python /app/infra/vm/secret_env.py tvlt/ray)" && ray start ...

The secret (one JSON object of strings) holds what a node must not read from its config file: RAY_AUTH_TOKEN,
MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD. The node's instance profile grants
secretsmanager:GetSecretValue on it; S3 needs no keys at all (the same instance profile). Values are shell-quoted and
never logged. botocore comes with the image (s3fs depends on it).
"""

from __future__ import annotations

import json
import re
import shlex
import sys

KEY = re.compile(r"[A-Z_][A-Z0-9_]*")


def exports(secret: dict[str, str]) -> str:
    bad = [k for k in secret if not KEY.fullmatch(k)]
    if bad:
        raise ValueError(f"secret keys must be environment variable names: {bad}")
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(secret.items()))


def main(argv: list[str]) -> int:
    import botocore.session  # region: AWS_DEFAULT_REGION, or the instance's through IMDS

    if len(argv) != 1:
        print("usage: secret_env.py SECRET_ID", file=sys.stderr)
        return 2
    client = botocore.session.get_session().create_client("secretsmanager")
    secret = json.loads(client.get_secret_value(SecretId=argv[0])["SecretString"])
    sys.stdout.write(exports(secret))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

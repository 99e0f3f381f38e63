"""An API Gateway Lambda REQUEST authorizer, written for AWS and run unchanged behind
mtlsproxy (``authorizer.format: apigateway``) by app.py.

The clients listed in ORDER_CLIENTS (their certificate subjects, ``;``-separated) may read
orders (GET /orders/*) but never delete them (DELETE /orders/*); anything else is refused,
by the explicit Deny or because no statement allows it. Every other client gets a Deny for
the whole API.

Input:  https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-lambda-authorizer-input.html
Output: https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-lambda-authorizer-output.html
"""

from __future__ import annotations

import os
from typing import Any


def order_clients() -> frozenset[str]:
    return frozenset(s.strip() for s in os.environ.get("ORDER_CLIENTS", "").split(";")
                     if s.strip())


def statement(effect: str, resource: str) -> dict[str, Any]:
    return {"Effect": effect, "Action": "execute-api:Invoke", "Resource": resource}


def lambda_handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    # methodArn: arn:aws:execute-api:<region>:<account>:<api id>/<stage>/<verb>/<resource>;
    # the policy names resources under the same API and stage.
    api, stage = event["methodArn"].split("/")[:2]
    base = f"{api}/{stage}"
    # Under mutual TLS the gateway (and mtlsproxy) verified the chain before calling.
    cert = event["requestContext"]["identity"]["clientCert"]
    subject = cert["subjectDN"]
    if subject not in order_clients():
        return {"principalId": subject, "policyDocument": {
            "Version": "2012-10-17", "Statement": [statement("Deny", f"{base}/*")]}}
    return {
        "principalId": subject,
        "policyDocument": {"Version": "2012-10-17", "Statement": [
            statement("Allow", f"{base}/GET/orders/*"),
            statement("Deny", f"{base}/DELETE/orders/*"),
        ]},
        # Strings, numbers and booleans only; upstream as X-Authorizer-<key> headers.
        "context": {"serial": cert["serialNumber"], "orders": "read"},
    }

"""``routes[].authorizer.format: apigateway``: the AWS API Gateway REST API's Lambda
``REQUEST`` authorizer contract, so that an existing gateway authorizer function needs only
a thin HTTP wrapper (examples/apigateway-authorizer/). Pure: no I/O, no clock but the
event's timestamp.

- The event (``request_event``) is shaped as the gateway sends it to a REQUEST authorizer:
  https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-lambda-authorizer-input.html
  with ``requestContext.identity.clientCert`` as the gateway fills it under mutual TLS
  (https://docs.aws.amazon.com/apigateway/latest/developerguide/rest-api-mutual-tls.html;
  the date and serial formats are those of the gateway's published example events:
  ``"May 28 12:30:02 2019 GMT"``, ``"a1:a1:..."``).
- The answer (``parse_policy``) is the gateway's output shape, ``principalId``,
  ``policyDocument``, ``context``:
  https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-lambda-authorizer-output.html
  evaluated as the gateway evaluates it against the method ARN of each request (IAM: an
  explicit Deny wins, no matching Allow is a deny):
  https://docs.aws.amazon.com/apigateway/latest/developerguide/api-gateway-control-access-using-iam-policies-to-invoke-api.html

Wildcards. ``*`` and ``?`` in a ``Resource`` are IAM's (any run of characters, one
character). The gateway documents that a ``*`` ending the pattern matches everything to its
right, across ``/`` (``.../GET/user/*`` admits ``.../GET/user/1/sensitive``), but not how far a
``*`` in the middle reaches. So a pattern is read both ways and the reading that admits less
wins: an **Allow** matches narrowly (a ``*`` inside the pattern stays within one ``/`` path
segment, or one ``:`` field of the ARN; only a final ``*`` runs to the end), a **Deny**
broadly (every ``*`` runs across anything). A mismatch between the two readings can only
refuse more than the gateway would, never admit more.

Paths. The ARN holds the path as the proxy routes and forwards it (already normalised,
without the query). An Allow must also match the path as the most lenient upstream reads
it (``http.normalize.routing_view``: lower-cased, ``%2F`` as ``/``); a Deny matching either
refuses. ``/orders/..%2Fadmin`` is therefore never admitted by an Allow for ``/orders/*``.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

from mtlsproxy.admission.answers import HEADER_TOKEN, loads_answer
from mtlsproxy.http.events import Request
from mtlsproxy.http.normalize import routing_view
from mtlsproxy.identity.headers import fold, safe_value
from mtlsproxy.identity.peer import ClientIdentity

Headers = tuple[tuple[bytes, bytes], ...]

# Context entries go upstream under this prefix; a client's headers of it, in any spelling
# (case, _ for -), are always dropped (http/header_rules.py): only the authorizer's reach
# upstream.
CONTEXT_PREFIX = "X-Authorizer-"
PRINCIPAL_HEADER = b"X-Authorizer-PrincipalId"
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
_STATEMENT_KEYS = frozenset({"Sid", "Effect", "Action", "Resource"})
_INVOKE = "execute-api:Invoke"


# -- the event ----------------------------------------------------------------------------

def method_arn(arn_prefix: str, method: bytes, path: bytes) -> str:
    """``<arn_prefix>/<HTTP method>/<resource path without its leading slash>`` (the
    gateway's ``arn:aws:execute-api:{region}:{account}:{api}/{stage}/{verb}/{resource}``)."""
    return f"{arn_prefix}/{method.decode('latin-1')}/{path.decode('latin-1')[1:]}"


def gateway_time(t: dt.datetime) -> str:
    """OpenSSL's ``notBefore`` text, as the gateway writes it: ``Aug  5 09:36:04 2021 GMT``
    (the day space-padded; English month names whatever the locale)."""
    t = t.astimezone(dt.UTC)
    return f"{_MONTHS[t.month - 1]} {t.day:2d} {t:%H:%M:%S} {t.year} GMT"


def gateway_serial(serial_hex: str) -> str:
    """The serial number as colon-separated lower-case hex bytes (``a1:b2:...``)."""
    digits = serial_hex.lower()
    if len(digits) % 2:
        digits = "0" + digits
    return ":".join(digits[i:i + 2] for i in range(0, len(digits), 2))


def _query(query: bytes) -> tuple[dict[str, str] | None, dict[str, list[str]] | None]:
    # The REST API's queryStringParameters hold the last value of a repeated name, the
    # multi-value map all of them; both are null without a query (the input page above).
    if not query:
        return None, None
    multi: dict[str, list[str]] = {}
    for name, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        multi.setdefault(name, []).append(value)
    if not multi:
        return None, None
    return {k: v[-1] for k, v in multi.items()}, multi


def request_event(identity: ClientIdentity, req: Request, arn_prefix: str,
                  headers: dict[str, str], pem: str) -> dict[str, Any]:
    """The REQUEST authorizer event for ``req``. ``headers``: those the operator forwards
    (``forward_headers``, filtered as for the mtlsproxy format); ``pem``: the leaf."""
    path, _, query = req.target.partition(b"?")
    text_path = path.decode("latin-1")
    method = req.method.decode("latin-1")
    single, multi = _query(query)
    # arn:<partition>:execute-api:<region>:<account>:<api id>/<stage> (checked when the
    # config was read).
    fields = arn_prefix.split(":", 5)
    api_id, _, stage = fields[5].partition("/")
    now = time.time()
    user_agent = next((v for n, v in req.headers if n == b"user-agent"), None)
    return {
        "type": "REQUEST",
        "methodArn": method_arn(arn_prefix, req.method, path),
        # No resource templates here: every path is its own resource.
        "resource": text_path,
        "path": text_path,
        "httpMethod": method,
        "headers": headers,
        "multiValueHeaders": {name: [value] for name, value in headers.items()},
        "queryStringParameters": single,
        "multiValueQueryStringParameters": multi,
        "pathParameters": None,
        "stageVariables": None,
        "requestContext": {
            "accountId": fields[4],
            "apiId": api_id,
            "stage": stage,
            "resourcePath": text_path,
            "path": text_path,
            "httpMethod": method,
            "domainName": req.host.decode("latin-1"),
            "protocol": "HTTP/2.0" if req.http_version == b"2"
            else "HTTP/" + req.http_version.decode("latin-1"),
            "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
            "requestTimeEpoch": int(now * 1000),
            "identity": {
                "userAgent": user_agent.decode("latin-1") if user_agent else None,
                "clientCert": {
                    "clientCertPem": pem,
                    "subjectDN": identity.subject,
                    "issuerDN": identity.issuer,
                    "serialNumber": gateway_serial(identity.serial_hex),
                    "validity": {"notBefore": gateway_time(identity.not_before),
                                 "notAfter": gateway_time(identity.not_after)},
                },
            },
        },
    }


# -- the answer ---------------------------------------------------------------------------

def _glob(pattern: str, broad: bool) -> re.Pattern[str]:
    """An IAM resource pattern as a regular expression (see the module's "Wildcards").

    Built as ``fnmatch.translate`` builds its own: each ``*`` followed by another takes
    the first occurrence of the text between them, in an atomic group, so that no pattern
    backtracks more than linearly over a path the client chose (a glob matches from the
    first occurrence whenever it matches from a later one: the next ``*`` can take the
    difference, within the same ``/`` segment or ``:`` field when the text has none)."""
    pieces: list[str | None] = []  # a regular expression for one character, or None: *
    classes: list[str] = []  # each *'s character class
    colons = 0
    last = len(pattern) - 1
    for i, ch in enumerate(pattern):
        in_resource = colons >= 5  # past arn:partition:service:region:account:
        one = "." if broad else ("[^/]" if in_resource else "[^:]")
        if ch == "*":
            pieces.append(None)
            classes.append("." if i == last else one)
        elif ch == "?":
            pieces.append(one)
        else:
            colons += ch == ":"
            pieces.append(re.escape(ch))
    chunks: list[list[str]] = [[]]  # the text before the first *, then after each
    for piece in pieces:
        if piece is None:
            chunks.append([])
        else:
            chunks[-1].append(piece)
    out = "".join(chunks[0])
    for n, (cls, chunk) in enumerate(zip(classes, chunks[1:], strict=True)):
        text = "".join(chunk)
        out += f"{cls}*{text}" if n == len(classes) - 1 else f"(?>{cls}*?{text})"
    return re.compile(out, re.DOTALL | (re.IGNORECASE if broad else 0))


@dataclass(frozen=True)
class Resources:
    """The ``Resource`` patterns of a policy's statements of one ``Effect`` (those whose
    ``Action`` covers ``execute-api:Invoke``), matched against a request's method ARN."""

    arn_prefix: str
    deny: bool
    exact: tuple[re.Pattern[str], ...]
    lenient: tuple[re.Pattern[str], ...]  # case-insensitive, for the routing view

    def matches(self, method: bytes, path: bytes) -> bool:
        if not self.exact:
            return False
        arn = method_arn(self.arn_prefix, method, path)
        lenient = routing_view(path)
        view = method_arn(self.arn_prefix, method, lenient)
        if path.endswith(b"/") and not lenient.endswith(b"/"):
            # The routing view drops a trailing "/" (Express and Rails ignore it): a Deny
            # for "/orders/1" refuses "/orders/1/". An Allow is matched with it kept, so
            # that "GET/orders/*" still admits "/orders/", as the gateway does.
            kept = method_arn(self.arn_prefix, method, lenient + b"/")
        else:
            kept = view
        if self.deny:
            # Broad patterns, every reading of the path: a Deny refuses whenever it may.
            return any(p.fullmatch(arn) or p.fullmatch(view) or p.fullmatch(kept)
                       for p in self.exact)
        view = kept
        # Narrow patterns, and both readings of the path must be admitted.
        return any(p.fullmatch(arn) for p in self.exact) and \
            any(p.fullmatch(view) for p in self.lenient)


def _strings(value: Any, where: str) -> list[str]:
    """IAM's "a string or a list of strings"."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(
            isinstance(v, str) and v for v in items):
        raise ValueError(f"{where}: must be a string or a non-empty list of strings")
    return items


def _covers_invoke(actions: list[str]) -> bool:
    # IAM action names compare without case, with * and ? wildcards.
    return any(_glob(a, broad=True).fullmatch(_INVOKE) for a in actions)


def _context_value(value: Any, where: str) -> str:
    # The gateway accepts strings, numbers and booleans only, and refuses an object or an
    # array (the output page above); it stringifies booleans as true/false.
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return json.dumps(value)
    raise ValueError(f"{where}: must be a string, a number or a boolean")


@dataclass(frozen=True)
class GatewayPolicy:
    allow: Resources
    deny: Resources
    headers: Headers  # the principal and the context, for every request the policy admits


def parse_policy(status: int, body: bytes, arn_prefix: str) -> GatewayPolicy:
    """A gateway authorizer's answer; ValueError when malformed (anything we could not
    evaluate exactly as written refuses the whole answer: fail closed)."""
    if not 200 <= status < 300:
        raise ValueError(f"authorizer answered {status}")
    doc = loads_answer(body)
    if not isinstance(doc, dict):
        raise ValueError("the answer must be an object")
    principal = doc.get("principalId")
    if not isinstance(principal, str):
        raise ValueError('"principalId" must be a string')
    policy = doc.get("policyDocument")
    if not isinstance(policy, dict):
        raise ValueError('"policyDocument" must be an object')
    if "Version" in policy and not isinstance(policy["Version"], str):
        raise ValueError('"policyDocument.Version" must be a string')
    raw_statements = policy.get("Statement")
    if isinstance(raw_statements, dict):
        raw_statements = [raw_statements]  # IAM takes one statement without a list
    if not isinstance(raw_statements, list):
        raise ValueError('"policyDocument.Statement" must be a list of statements')
    patterns: dict[bool, list[str]] = {True: [], False: []}
    for i, raw in enumerate(raw_statements):
        where = f"policyDocument.Statement[{i}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: must be an object")
        unknown = sorted(str(k) for k in raw if k not in _STATEMENT_KEYS)
        if unknown:
            # NotAction, NotResource, Condition, ...: a condition we would silently drop.
            raise ValueError(f"{where}: unsupported key(s) {', '.join(unknown)}")
        effect = raw.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise ValueError(f"{where}.Effect: must be Allow or Deny")
        actions = _strings(raw.get("Action"), f"{where}.Action")
        resources = _strings(raw.get("Resource"), f"{where}.Resource")
        for resource in resources:
            if resource != "*" and not resource.startswith("arn:"):
                raise ValueError(f"{where}.Resource: {resource!r} is not an ARN")
        if _covers_invoke(actions):
            patterns[effect == "Deny"].extend(resources)
    headers: list[tuple[bytes, bytes]] = [(PRINCIPAL_HEADER, safe_value(principal))]
    seen = {fold(PRINCIPAL_HEADER)}
    context = doc.get("context")
    if context is None:
        context = {}
    if not isinstance(context, dict):
        raise ValueError('"context" must be an object')
    for key, value in context.items():
        text = _context_value(value, f"context.{key}")
        if not HEADER_TOKEN.match(key):
            continue  # not a header name: dropped, as documented
        name = (CONTEXT_PREFIX + key).encode()
        if fold(name) in seen:
            continue  # the principal's, or another spelling of an earlier key
        seen.add(fold(name))
        headers.append((name, safe_value(text)))
    allow, deny = patterns[False], patterns[True]
    return GatewayPolicy(
        Resources(arn_prefix, False, tuple(_glob(p, False) for p in allow),
                  tuple(re.compile(_glob(p, False).pattern, re.DOTALL | re.IGNORECASE)
                        for p in allow)),
        Resources(arn_prefix, True, tuple(_glob(p, True) for p in deny), ()),
        tuple(headers))

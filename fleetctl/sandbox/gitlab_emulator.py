"""A GitLab emulator: a real HTTP peer on loopback that speaks the slice of the v4 API runner-fleet uses.

runner-fleet meets GitLab three ways: python-gitlab calls the REST API (runners, jobs, hooks), gitlab-runner
agents call the runner API (``/jobs/request``), and GitLab pushes Job Hooks at the webhook endpoint. Tests and
the sandbox need all three without a GitLab instance, over real sockets, so that timeouts, retries, pagination
and headers are exercised the way production exercises them. Mocking python-gitlab would hide exactly those.

This module is the HTTP half (moto's ``responses.py``): it parses requests, routes them to
``gitlab_model.GitLabModel``, injects faults at the wire, and delivers webhooks from a worker pool the way
GitLab's Sidekiq does: concurrently, unordered, and once. A failed delivery (4xx, 5xx, timeout, refused
connection) is logged and never sent again by itself; only a resend (the hook's "Resend request", or the
events API) repeats it, with the same Idempotency-Key. Failures count toward disabling the hook.
"""

from __future__ import annotations

import base64
import contextlib
import heapq
import hmac
import itertools
import json
import logging
import math
import re
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from enum import Enum
from hashlib import sha256
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from queue import Queue
from typing import Any, Self, TypeVar, cast
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

import requests
from requests.structures import CaseInsensitiveDict

from fleetctl.sandbox.gitlab_model import (
    API_SCOPE,
    CREATE_RUNNER_SCOPE,
    DEFAULT_SCRIPT,
    MAINTAINER_ACCESS,
    MANAGE_RUNNER_SCOPE,
    READ_API_SCOPE,
    RUNNER_FILTER_STATUSES,
    RUNNER_SCOPES,
    RUNNER_TYPES,
    SIGNING_TOKEN_PREFIX,
    TOKEN_SCOPES,
    AccessLevel,
    AccessToken,
    BadRequestError,
    Clock,
    Delivery,
    GitLabEmulatorError,
    GitLabModel,
    HookChanges,
    JobSpec,
    JobStatus,
    MessageError,
    OutgoingEvent,
    RequestHold,
    RunnerChanges,
    RunnerFilters,
    RunnerSettings,
    RunnerType,
    User,
    When,
    utcnow,
)

__all__ = ["Delivery", "GitLabEmulator", "JobSpec", "JobStatus"]

log = logging.getLogger(__name__)
E = TypeVar("E", bound=Enum)

API_PREFIX = "/api/v4"
DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 100
# A hook's events API pages by at most 20 (lib/api/hooks/events.rb).
MAX_HOOK_EVENTS_PER_PAGE = 20
# WebHookService keeps at most this much of a receiver's answer in the log, for display only.
RESPONSE_BODY_SIZE_LIMIT = 8 * 1024
# Idle keep-alive connections are closed after this long, as nginx in front of GitLab does (65 s by default).
IDLE_CONNECTION_TIMEOUT = 65.0
# Feature flag gating hook signing tokens (gitlab-org/gitlab!231325: "signing_token is silently ignored when the
# webhook_signing_token feature flag is disabled"), and the release that introduced them.
WEBHOOK_SIGNING_FLAG = "webhook_signing_token"
SIGNING_TOKEN_SINCE = (19, 0)
# The manage_runner scope (gitlab-org/gitlab!153285) opened /runners/:id endpoints in GitLab 17.1.
MANAGE_RUNNER_SINCE = (17, 1)
# StuckCiJobsWorker's cron, '0 * * * *' (config/initializers/1_settings.rb): a pass every hour.
STUCK_JOBS_INTERVAL = 3600.0
# Rack::OAuth2's description for insufficient_scope, which lib/api/api_guard.rb sends as the error_description.
INSUFFICIENT_SCOPE_DESCRIPTION = "The request requires higher privileges than provided by the access token."
EXPIRED_DESCRIPTION = "Token is expired. You can either do re-authorization or token refresh."
REVOKED_DESCRIPTION = "Token was revoked. You have to re-authorize from the user."


def parse_version(version: str) -> tuple[int, ...]:
    """``"17.9.0"`` or ``"19.0.0-ee"`` as ``(17, 9, 0)``."""
    numbers = re.findall(r"\d+", version.split("-", 1)[0])
    if not numbers:
        raise ValueError(f"not a GitLab version: {version!r}")
    return tuple(int(n) for n in numbers)


# ---------------------------------------------------------------------------------------------------------
# Requests, responses, routes
# ---------------------------------------------------------------------------------------------------------


class Auth(Enum):
    USER = "user"  # PRIVATE-TOKEN or Bearer token of any user; 401 without one
    ADMIN = "admin"  # as USER, and the user must be an administrator: 403 otherwise
    RUNNER = "runner"  # runner API: the runner or job token travels in the body


@dataclass(frozen=True)
class Scopes:
    """The token scopes an endpoint class registers with ``allow_access_with_scope`` (``lib/api/api_guard.rb``),
    besides the ones ``lib/api/api.rb`` registers for every endpoint: ``api``, and ``read_api`` on GET and HEAD.

    ``extra`` are accepted on ``methods`` (every method when empty); ``any`` accepts every scope, as
    ``GET /personal_access_tokens/self`` does."""

    extra: tuple[str, ...] = ()
    methods: frozenset[str] = frozenset()
    since: tuple[int, ...] = ()
    any: bool = False

    def registered(self, version: tuple[int, ...]) -> list[str]:
        """Every scope the endpoint registers, in GitLab's order: what an insufficient_scope answer lists."""
        extra = list(self.extra) if version >= self.since else []
        return [*extra, API_SCOPE, READ_API_SCOPE]

    def accepts(self, scopes: Sequence[str], method: str, version: tuple[int, ...]) -> bool:
        if self.any or API_SCOPE in scopes:
            return True
        if READ_API_SCOPE in scopes and method in {"GET", "HEAD"}:
            return True
        if version < self.since or (self.methods and method not in self.methods):
            return False
        return any(scope in scopes for scope in self.extra)


DEFAULT_SCOPES = Scopes()


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str  # after /api/v4, still percent-encoded
    query: list[tuple[str, str]]
    params: dict[str, Any]  # query, form and JSON body merged; "key[]" collected as "key": [...]
    path_params: dict[str, str]
    base_url: str  # scheme://host[:port] as the client addressed us, for Link headers
    user: User | None = None  # whom the access token authenticates; None on the runner API
    token: AccessToken | None = None  # the access token itself; None on the runner API
    headers: Mapping[str, str] = field(default_factory=dict)  # looked up case-insensitively
    body: bytes = b""  # as sent, for the endpoints that take a raw body (the job trace)


@dataclass
class ApiResponse:
    status: int
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    raw: str | None = None  # sent as-is instead of ``body`` (fault injection)

    def encode(self) -> tuple[bytes, str]:
        if self.raw is not None:
            # An injected body may be a proxy's HTML error page as well as JSON.
            try:
                json.loads(self.raw)
            except ValueError:
                html = self.raw.lstrip().startswith("<")
                return self.raw.encode(), "text/html; charset=utf-8" if html else "text/plain; charset=utf-8"
            return self.raw.encode(), "application/json"
        if self.body is None:
            return b"", "application/json"
        return json.dumps(self.body).encode(), "application/json"


def oauth_error(status: int, error: str, description: str, **extra: str) -> ApiResponse:
    """Rack::OAuth2's bearer error, as ``lib/api/api_guard.rb`` answers token failures: a JSON body with
    ``error`` and ``error_description`` (and ``scope`` for insufficient_scope). Its 401s carry a
    ``WWW-Authenticate`` challenge; its 403 does not (the FIXME in api_guard.rb)."""
    body = {"error": error, "error_description": description, **extra}
    headers = {}
    if status == 401:
        headers["WWW-Authenticate"] = f'Bearer realm="", error="{error}", error_description="{description}"'
    return ApiResponse(status, body, headers)


def message(status: int) -> ApiResponse:
    """GitLab's bare error body, e.g. ``{"message": "404 Not Found"}``."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:  # an injected fault may use a status with no standard name
        phrase = "Error"
    return ApiResponse(status, {"message": f"{status} {phrase}"})


Handler = Callable[[ApiRequest], ApiResponse]


@dataclass(frozen=True)
class Route:
    method: str
    template: str
    pattern: re.Pattern[str]
    handler: Handler
    auth: Auth
    scopes: Scopes = DEFAULT_SCOPES

    @classmethod
    def build(
        cls, method: str, template: str, handler: Handler, auth: Auth = Auth.USER, scopes: Scopes = DEFAULT_SCOPES
    ) -> Route:
        parts = [f"(?P<{part[1:]}>[^/]+)" if part.startswith(":") else re.escape(part) for part in template.split("/")]
        return cls(method, template, re.compile("/".join(parts)), handler, auth, scopes)


@dataclass
class Fault:
    method: str
    pattern: re.Pattern[str]
    status: int
    remaining: int
    delay: float
    body: str | None
    after_processing: bool = False

    def matches(self, method: str, path: str) -> bool:
        return self.remaining > 0 and self.method in {"*", method} and bool(self.pattern.fullmatch(path))

    def respond(self, stopping: threading.Event) -> ApiResponse:
        # Sleeping on the stop event lets stop() end a simulated hang at once.
        stopping.wait(self.delay)
        return message(self.status) if self.body is None else ApiResponse(self.status, raw=self.body)


# ---------------------------------------------------------------------------------------------------------
# Parameter parsing: GitLab accepts JSON, form bodies and query strings alike
# ---------------------------------------------------------------------------------------------------------


def _merge_pairs(pairs: Sequence[tuple[str, str]], into: dict[str, Any]) -> None:
    for key, value in pairs:
        if key.endswith("[]"):
            into.setdefault(key[:-2], [])
            if isinstance(into[key[:-2]], list):
                into[key[:-2]].append(value)
        else:
            into[key] = value


def parse_params(query: Sequence[tuple[str, str]], content_type: str, body: bytes) -> dict[str, Any]:
    params: dict[str, Any] = {}
    _merge_pairs(query, params)
    if not body:
        return params
    if content_type.startswith("application/json"):
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise BadRequestError("body is not valid JSON") from exc
        if not isinstance(data, dict):
            raise BadRequestError("body must be a JSON object")
        params.update(data)
    elif content_type.startswith("application/x-www-form-urlencoded"):
        _merge_pairs(parse_qsl(body.decode(), keep_blank_values=True), params)
    return params


def p_str(params: Mapping[str, Any], key: str, *, required: bool = False) -> str | None:
    value = params.get(key)
    if value is None:
        if required:
            raise BadRequestError(f"{key} is missing")
        return None
    if isinstance(value, list | dict):
        raise BadRequestError(f"{key} is invalid")
    return str(value)


def p_bool(params: Mapping[str, Any], key: str) -> bool | None:
    value = params.get(key)
    if value is None or isinstance(value, bool):
        return value
    text = str(value).lower()
    if text in {"true", "1", "yes", "t"}:
        return True
    if text in {"false", "0", "no", "f"}:
        return False
    raise BadRequestError(f"{key} is invalid")


def p_int(params: Mapping[str, Any], key: str, *, required: bool = False) -> int | None:
    value = p_str(params, key, required=required)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError as exc:
        raise BadRequestError(f"{key} is invalid") from exc


def p_tags(params: Mapping[str, Any], key: str = "tag_list") -> list[str] | None:
    """Tags come as a JSON list or, from python-gitlab and forms, as one comma-separated string."""
    value = params.get(key)
    if value is None:
        return None
    items = value if isinstance(value, list) else str(value).split(",")
    return [str(item).strip() for item in items if str(item).strip()]


def p_enum(params: Mapping[str, Any], key: str, enum: type[E]) -> E | None:
    value = p_str(params, key)
    if value is None:
        return None
    try:
        return enum(value)
    except ValueError as exc:
        raise BadRequestError(f"{key} does not have a valid value") from exc


def p_statuses(params: Mapping[str, Any], key: str) -> list[JobStatus]:
    """``scope[]=pending&scope[]=running`` or ``scope=pending``."""
    value = params.get(key)
    values = value if isinstance(value, list) else [] if value is None else [value]
    try:
        return [JobStatus(str(v)) for v in values]
    except ValueError as exc:
        raise BadRequestError(f"{key} does not have a valid value") from exc


def paginate(req: ApiRequest, items: list[dict[str, Any]]) -> ApiResponse:
    """A page of ``items`` with GitLab's offset pagination headers, which python-gitlab follows."""
    try:
        page = max(1, int(req.params.get("page", 1)))
        per_page = min(MAX_PER_PAGE, max(1, int(req.params.get("per_page", DEFAULT_PER_PAGE))))
    except (TypeError, ValueError):
        page, per_page = 1, DEFAULT_PER_PAGE
    total = len(items)
    total_pages = max(1, math.ceil(total / per_page))
    next_page = page + 1 if page < total_pages else None
    prev_page = page - 1 if 1 < page <= total_pages + 1 else None

    def link(to: int) -> str:
        query = [(k, v) for k, v in req.query if k not in {"page", "per_page"}]
        query += [("page", str(to)), ("per_page", str(per_page))]
        return f"{req.base_url}{API_PREFIX}{req.path}?{urlencode(query)}"

    links = [(prev_page, "prev"), (next_page, "next"), (1, "first"), (total_pages, "last")]
    headers = {
        "X-Page": str(page),
        "X-Per-Page": str(per_page),
        "X-Total": str(total),
        "X-Total-Pages": str(total_pages),
        "X-Next-Page": str(next_page or ""),
        "X-Prev-Page": str(prev_page or ""),
        "Link": ", ".join(f'<{link(to)}>; rel="{rel}"' for to, rel in links if to is not None),
    }
    return ApiResponse(200, items[(page - 1) * per_page : page * per_page], headers)


# ---------------------------------------------------------------------------------------------------------
# The API: routing and handlers. Each handler parses, calls the model once, and shapes the answer.
# ---------------------------------------------------------------------------------------------------------


class GitLabApi:
    def __init__(self, model: GitLabModel, *, version: str, stopping: threading.Event) -> None:
        self._model = model
        self._version = version
        self._release = parse_version(version)
        self._stopping = stopping
        self._faults: list[Fault] = []
        self._calls: Counter[tuple[str, str]] = Counter()
        self._execute: Callable[[OutgoingEvent], Delivery] | None = None
        self._routes = self._route_table()

    def set_executor(self, execute: Callable[[OutgoingEvent], Delivery]) -> None:
        """Where a resend is sent from: synchronously, within the API request, as GitLab's WebHook#execute."""
        self._execute = execute

    # -- wire-level controls --

    def add_fault(self, fault: Fault) -> None:
        with self._model.lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        with self._model.lock:
            self._faults.clear()

    def calls(self) -> Counter[tuple[str, str]]:
        with self._model.lock:
            return Counter(self._calls)

    def handle(self, method: str, target: str, headers: Mapping[str, str], body: bytes, base_url: str) -> ApiResponse:
        """Answer one request. ``headers`` must look names up case-insensitively, as HTTP headers are."""
        split = urlsplit(target)
        if not split.path.startswith(API_PREFIX + "/"):
            return message(404)
        path = split.path[len(API_PREFIX) :]
        route, path_params = self._match(method, path)
        fault = self._count_call(method, path, route)
        if fault is not None and not fault.after_processing:
            return fault.respond(self._stopping)
        answer = self._answer(method, split.query, headers, body, base_url, route, path, path_params)
        # A fault after processing: GitLab did the work, but the client never hears of it (a lost answer).
        return fault.respond(self._stopping) if fault is not None else answer

    def _answer(
        self,
        method: str,
        query_string: str,
        headers: Mapping[str, str],
        body: bytes,
        base_url: str,
        route: Route | None,
        path: str,
        path_params: dict[str, str],
    ) -> ApiResponse:
        if route is None:
            return message(404)
        token = None
        if route.auth is not Auth.RUNNER:
            token = self._token(headers)
            refused = self._refuse(token, route, method)
            if refused is not None:
                return refused
            assert token is not None
            self._model.use_access_token(token)
        try:
            query = parse_qsl(query_string, keep_blank_values=True)
            params = parse_params(query, headers.get("Content-Type") or "", body)
            user = None if token is None else token.user
            request = ApiRequest(method, path, query, params, path_params, base_url, user, token, headers, body)
            return route.handler(request)
        except GitLabEmulatorError as exc:
            return ApiResponse(exc.status, exc.body, dict(exc.headers))

    def _match(self, method: str, path: str) -> tuple[Route | None, dict[str, str]]:
        for route in self._routes:
            if route.method == method and (found := route.pattern.fullmatch(path)):
                return route, {k: unquote(v) for k, v in found.groupdict().items()}
        return None, {}

    def _count_call(self, method: str, path: str, route: Route | None) -> Fault | None:
        """Count the call, and claim the first injected fault that matches it, if any."""
        with self._model.lock:
            self._calls[(method, route.template if route else "<unrouted>")] += 1
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.remaining -= 1
                    return fault
            return None

    def _token(self, headers: Mapping[str, str]) -> AccessToken | None:
        token = headers.get("PRIVATE-TOKEN")
        if token is None:
            scheme, _, bearer = (headers.get("Authorization") or "").partition(" ")
            token = bearer if scheme.lower() == "bearer" else None
        return None if token is None else self._model.access_token(token)

    def _refuse(self, token: AccessToken | None, route: Route, method: str) -> ApiResponse | None:
        """GitLab's answer to a token that may not make this request, in the order
        ``AccessTokenValidationService#validate`` checks (expired, revoked, scopes), then the route's own
        administrator check; None when the request may go on."""
        if token is None:
            return message(401)
        if token.expired(self._model.now()):
            return oauth_error(401, "invalid_token", EXPIRED_DESCRIPTION)
        if token.revoked:
            return oauth_error(401, "invalid_token", REVOKED_DESCRIPTION)
        if not route.scopes.accepts(token.scopes, method, self._release):
            registered = " ".join(route.scopes.registered(self._release))
            return oauth_error(403, "insufficient_scope", INSUFFICIENT_SCOPE_DESCRIPTION, scope=registered)
        if route.auth is Auth.ADMIN and not token.user.admin:
            return message(403)
        return None

    def signing_honoured(self) -> bool:
        return self._release >= SIGNING_TOKEN_SINCE and WEBHOOK_SIGNING_FLAG in self._model.features

    def _route_table(self) -> list[Route]:
        r = Route.build
        # lib/api/users.rb: GET /user also takes read_user. lib/api/user_runners.rb: POST /user/runners also takes
        # create_runner. lib/api/ci/runners.rb: every /runners/:id endpoint also takes manage_runner (17.1 on).
        read_user = Scopes(("read_user",), frozenset({"GET", "HEAD"}))
        create_runner = Scopes((CREATE_RUNNER_SCOPE,), frozenset({"POST"}))
        manage_runner = Scopes((MANAGE_RUNNER_SCOPE,), since=MANAGE_RUNNER_SINCE)
        # lib/api/personal_access_tokens/self_information.rb: any token may read itself, whatever its scopes.
        any_scope = Scopes(tuple(sorted(TOKEN_SCOPES)), any=True)
        # Literal segments precede ":param" ones that would also match them (/runners/all, /runners/:id).
        return [
            r("GET", "/version", self._version_info),
            r("GET", "/user", lambda req: ApiResponse(200, self._model.current_user(_user(req))), scopes=read_user),
            r("GET", "/personal_access_tokens/self", self._token_self, scopes=any_scope),
            r("GET", "/projects", lambda req: paginate(req, self._model.list_projects())),
            r("POST", "/projects", self._create_project),
            r("GET", "/projects/:id", lambda req: ApiResponse(200, self._model.get_project(_pid(req)))),
            r("GET", "/projects/:id/protected_branches", self._list_protected_branches),
            r("POST", "/projects/:id/protected_branches", self._protect_branch),
            r("GET", "/projects/:id/hooks", lambda req: paginate(req, self._model.list_hooks(_pid(req)))),
            r("POST", "/projects/:id/hooks", self._create_hook),
            r("GET", "/projects/:id/hooks/:hook_id", self._get_hook),
            r("PUT", "/projects/:id/hooks/:hook_id", self._update_hook),
            r("DELETE", "/projects/:id/hooks/:hook_id", self._delete_hook),
            r("GET", "/projects/:id/hooks/:hook_id/events", self._list_hook_events),
            r("POST", "/projects/:id/hooks/:hook_id/events/:hook_log_id/resend", self._resend_hook_event),
            r("POST", "/projects/:id/pipeline", self._create_pipeline),
            r("GET", "/projects/:id/pipelines", self._list_pipelines),
            r("GET", "/projects/:id/pipelines/:pipeline_id", self._get_pipeline),
            r("GET", "/projects/:id/pipelines/:pipeline_id/jobs", self._list_pipeline_jobs),
            r("GET", "/projects/:id/jobs", self._list_jobs),
            r("GET", "/projects/:id/jobs/:job_id", self._get_job),
            r("POST", "/projects/:id/jobs/:job_id/retry", self._retry_job),
            r("POST", "/projects/:id/jobs/:job_id/cancel", self._cancel_job),
            r("GET", "/projects/:id/runners", self._list_project_runners),
            r("POST", "/projects/:id/runners", self._enable_project_runner),
            r("GET", "/groups/:id/runners", self._list_group_runners),
            r("GET", "/groups/:id/members/all/:user_id", lambda req: self._member(req, "group")),
            r("GET", "/projects/:id/members/all/:user_id", lambda req: self._member(req, "project")),
            r("POST", "/user/runners", self._create_runner, scopes=create_runner),
            r("GET", "/runners", lambda req: self._list_runners(req, all_runners=False)),
            # Administrators (and auditors) only, and not offered on GitLab.com at all.
            r("GET", "/runners/all", lambda req: self._list_runners(req, all_runners=True), Auth.ADMIN),
            r("POST", "/runners/verify", self._verify_runner, Auth.RUNNER),
            r("DELETE", "/runners", self._delete_runner_by_token, Auth.RUNNER),
            r(
                "GET",
                "/runners/:id",
                lambda req: ApiResponse(200, self._model.get_runner(_rid(req))),
                scopes=manage_runner,
            ),
            r("PUT", "/runners/:id", self._update_runner, scopes=manage_runner),
            r("DELETE", "/runners/:id", self._delete_runner, scopes=manage_runner),
            r(
                "POST",
                "/runners/:id/reset_authentication_token",
                lambda req: ApiResponse(201, self._model.reset_runner_token(_rid(req), _user(req))),
                scopes=manage_runner,
            ),
            r("GET", "/runners/:id/jobs", self._runner_jobs, scopes=manage_runner),
            r("GET", "/runners/:id/managers", self._runner_managers, scopes=manage_runner),
            r("POST", "/jobs/request", self._request_job, Auth.RUNNER),
            r("PUT", "/jobs/:job_id", self._update_job, Auth.RUNNER),
            r("PATCH", "/jobs/:job_id/trace", self._append_trace, Auth.RUNNER),
            r("GET", "/sandbox/deliveries", self._deliveries),
        ]

    # -- handlers --

    def _version_info(self, _req: ApiRequest) -> ApiResponse:
        return ApiResponse(200, {"version": self._version, "revision": "emulator", "enterprise": False})

    def _token_self(self, req: ApiRequest) -> ApiResponse:
        if req.token is None:  # routes with Auth.USER always carry one
            raise RuntimeError("GET /personal_access_tokens/self reached its handler without a token")
        return ApiResponse(200, self._model.personal_access_token_json(req.token))

    def _create_project(self, req: ApiRequest) -> ApiResponse:
        project = self._model.create_project(
            name=p_str(req.params, "name"),
            path=p_str(req.params, "path"),
            namespace_id=p_int(req.params, "namespace_id"),
            description=p_str(req.params, "description"),
        )
        return ApiResponse(201, project)

    def _list_protected_branches(self, req: ApiRequest) -> ApiResponse:
        return paginate(req, self._model.list_protected_branches(_pid(req)))

    def _protect_branch(self, req: ApiRequest) -> ApiResponse:
        """lib/api/protected_branches.rb: ``name`` is required, the access levels default to maintainers."""
        branch = self._model.protect_branch(
            _pid(req),
            p_str(req.params, "name", required=True) or "",
            push_access_level=_access_level(req.params, "push_access_level"),
            merge_access_level=_access_level(req.params, "merge_access_level"),
            allow_force_push=bool(p_bool(req.params, "allow_force_push")),
        )
        return ApiResponse(201, branch)

    def _create_hook(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(201, self._model.create_hook(_pid(req), _hook_changes(req.params, creating=True)))

    def _get_hook(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(200, self._model.get_hook(_pid(req), _int_param(req, "hook_id")))

    def _update_hook(self, req: ApiRequest) -> ApiResponse:
        changes = _hook_changes(req.params, creating=False)
        return ApiResponse(200, self._model.update_hook(_pid(req), _int_param(req, "hook_id"), changes))

    def _delete_hook(self, req: ApiRequest) -> ApiResponse:
        self._model.delete_hook(_pid(req), _int_param(req, "hook_id"))
        return ApiResponse(204)

    def _list_hook_events(self, req: ApiRequest) -> ApiResponse:
        per_page = p_int(req.params, "per_page")
        if per_page is not None and not 1 <= per_page <= MAX_HOOK_EVENTS_PER_PAGE:
            raise BadRequestError("per_page does not have a valid value")
        status = req.params.get("status")
        statuses = [s for v in (status if isinstance(status, list) else [status or ""]) for s in str(v).split(",") if s]
        for value in statuses:
            if value not in {"successful", "client_failure", "server_failure"} and not _is_http_status(value):
                raise BadRequestError("status does not have a valid value")
        events = self._model.list_hook_logs(_pid(req), _int_param(req, "hook_id"), statuses)
        return paginate(req, events)

    def _resend_hook_event(self, req: ApiRequest) -> ApiResponse:
        if self._execute is None:
            raise RuntimeError("the GitLab emulator has no webhook executor")
        # The resend runs within this request, so it carries the request's X-Gitlab-Event-UUID when there is one
        # (Gitlab::Middleware::WebhookRecursionDetection), else a new one.
        event = self._model.resend_execution(
            _pid(req),
            _int_param(req, "hook_id"),
            _int_param(req, "hook_log_id"),
            req.headers.get("X-Gitlab-Event-UUID"),
        )
        delivery = self._execute(event)
        if delivery.status_code is None:
            # WebHookService#execute answers a transport error with its message; the API passes it on as a 422.
            return ApiResponse(422, {"message": delivery.error or "internal error"})
        return ApiResponse(201, {"response_status": delivery.status_code})

    def _create_pipeline(self, req: ApiRequest) -> ApiResponse:
        # "tag" is the emulator's own extension, like "jobs" and "stages": GitLab learns it from the repository.
        ref = p_str(req.params, "ref", required=True) or "main"
        stages = p_tags(req.params, "stages")
        jobs = _job_specs(req.params.get("jobs"))
        pipeline = self._model.create_pipeline(_pid(req), ref, jobs, stages, tag=bool(p_bool(req.params, "tag")))
        return ApiResponse(201, pipeline)

    def _list_pipelines(self, req: ApiRequest) -> ApiResponse:
        return paginate(req, self._model.list_pipelines(_pid(req)))

    def _get_pipeline(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(200, self._model.get_pipeline(_pid(req), _int_param(req, "pipeline_id")))

    def _list_pipeline_jobs(self, req: ApiRequest) -> ApiResponse:
        jobs = self._model.list_pipeline_jobs(
            _pid(req),
            _int_param(req, "pipeline_id"),
            p_statuses(req.params, "scope"),
            include_retried=bool(p_bool(req.params, "include_retried")),
        )
        return paginate(req, jobs)

    def _list_jobs(self, req: ApiRequest) -> ApiResponse:
        return paginate(req, self._model.list_jobs(_pid(req), p_statuses(req.params, "scope")))

    def _get_job(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(200, self._model.get_job(_pid(req), _int_param(req, "job_id")))

    def _retry_job(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(201, self._model.retry_job(_pid(req), _int_param(req, "job_id")))

    def _cancel_job(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(201, self._model.cancel_job(_pid(req), _int_param(req, "job_id")))

    def _enable_project_runner(self, req: ApiRequest) -> ApiResponse:
        runner_id = p_int(req.params, "runner_id", required=True) or 0
        return ApiResponse(201, self._model.enable_project_runner(_pid(req), runner_id))

    def _create_runner(self, req: ApiRequest) -> ApiResponse:
        runner_type = p_enum(req.params, "runner_type", RunnerType)
        if runner_type is None:
            raise BadRequestError("runner_type is missing")
        settings = RunnerSettings(
            runner_type=runner_type,
            group_id=p_int(req.params, "group_id"),
            project_id=p_int(req.params, "project_id"),
            description=p_str(req.params, "description") or "",
            paused=bool(p_bool(req.params, "paused")),
            locked=bool(p_bool(req.params, "locked")),
            run_untagged=p_bool(req.params, "run_untagged") is not False,
            tag_list=p_tags(req.params) or [],
            access_level=p_enum(req.params, "access_level", AccessLevel) or AccessLevel.NOT_PROTECTED,
            maximum_timeout=p_int(req.params, "maximum_timeout"),
            maintenance_note=p_str(req.params, "maintenance_note"),
        )
        return ApiResponse(201, self._model.create_runner(settings, _user(req)))

    def _list_runners(self, req: ApiRequest, *, all_runners: bool) -> ApiResponse:
        # GET /runners takes only statuses as its deprecated scope; GET /runners/all takes types too.
        filters = _runner_filters(req, scopes=RUNNER_SCOPES if all_runners else RUNNER_FILTER_STATUSES)
        return paginate(req, self._model.list_runners(filters, all_runners=all_runners))

    def _member(self, req: ApiRequest, kind: str) -> ApiResponse:
        """lib/api/members.rb: a member of a group or project, inherited memberships included."""
        return ApiResponse(200, self._model.member(kind, req.path_params["id"], _int_param(req, "user_id")))

    def _list_group_runners(self, req: ApiRequest) -> ApiResponse:
        # The group listing declares no scope parameter: one sent is ignored.
        filters = _runner_filters(req, scopes=None)
        return paginate(req, self._model.list_group_runners(req.path_params["id"], filters))

    def _list_project_runners(self, req: ApiRequest) -> ApiResponse:
        filters = _runner_filters(req, scopes=RUNNER_SCOPES)
        return paginate(req, self._model.list_project_runners(_pid(req), filters))

    def _update_runner(self, req: ApiRequest) -> ApiResponse:
        active = p_bool(req.params, "active")  # deprecated inverse of paused, still sent by older clients
        paused = p_bool(req.params, "paused")
        changes = RunnerChanges(
            description=p_str(req.params, "description"),
            paused=paused if paused is not None else (None if active is None else not active),
            locked=p_bool(req.params, "locked"),
            run_untagged=p_bool(req.params, "run_untagged"),
            tag_list=p_tags(req.params),
            access_level=p_enum(req.params, "access_level", AccessLevel),
            maximum_timeout=p_int(req.params, "maximum_timeout"),
            maintenance_note=p_str(req.params, "maintenance_note"),
        )
        return ApiResponse(200, self._model.update_runner(_rid(req), changes, _user(req)))

    def _delete_runner(self, req: ApiRequest) -> ApiResponse:
        self._model.delete_runner(_rid(req), _user(req))
        return ApiResponse(204)

    def _delete_runner_by_token(self, req: ApiRequest) -> ApiResponse:
        self._model.delete_runner_by_token(p_str(req.params, "token", required=True) or "")
        return ApiResponse(204)

    def _runner_jobs(self, req: ApiRequest) -> ApiResponse:
        return paginate(req, self._model.runner_jobs(_rid(req), p_statuses(req.params, "status")))

    def _runner_managers(self, req: ApiRequest) -> ApiResponse:
        return ApiResponse(200, self._model.runner_managers(_rid(req)))

    def _verify_runner(self, req: ApiRequest) -> ApiResponse:
        token = p_str(req.params, "token", required=True) or ""
        return ApiResponse(200, self._model.verify_runner(token, p_str(req.params, "system_id")))

    def _request_job(self, req: ApiRequest) -> ApiResponse:
        # Every 204 carries the runner's queue value in X-GitLab-Last-Update (lib/api/ci/runner.rb), which
        # gitlab-runner sends back as last_update; a 201 carries none.
        token = p_str(req.params, "token", required=True) or ""
        answer = self._model.request_job(token, p_str(req.params, "system_id"), p_str(req.params, "last_update"))
        if answer.job is not None:
            return ApiResponse(201, answer.job)
        return ApiResponse(204, headers={"X-GitLab-Last-Update": answer.last_update or ""})

    def _update_job(self, req: ApiRequest) -> ApiResponse:
        # Grape requires the token; the state is optional, and one the runner may not report is a 400 whose
        # body, like that of the 200, is the HTTP status itself (UpdateBuildStateService's result).
        token = p_str(req.params, "token", required=True) or ""
        status, job_status = self._model.update_job_from_runner(
            _int_param(req, "job_id"), token, p_str(req.params, "state"), p_str(req.params, "failure_reason")
        )
        return ApiResponse(status, str(status), {"Job-Status": job_status})

    def _append_trace(self, req: ApiRequest) -> ApiResponse:
        # gitlab-runner sends the job token in the JOB-TOKEN header and the log bytes as the body.
        token = p_str(req.params, "token") or req.headers.get("JOB-TOKEN") or ""
        size, job_status = self._model.append_trace(
            _int_param(req, "job_id"), token, req.headers.get("Content-Range"), req.body
        )
        headers = {"Job-Status": job_status, "Range": f"0-{size}", "X-GitLab-Trace-Update-Interval": "60"}
        return ApiResponse(202, headers=headers)

    def _deliveries(self, req: ApiRequest) -> ApiResponse:
        since = p_int(req.params, "since") or 0
        return ApiResponse(200, [d.to_json() for d in self._model.deliveries(since)])


def _is_http_status(value: str) -> bool:
    try:
        HTTPStatus(int(value))
    except ValueError:
        return False
    return True


def _int_param(req: ApiRequest, key: str) -> int:
    value = req.path_params[key]
    if not value.isdigit():
        raise BadRequestError(f"{key} is invalid")
    return int(value)


def _user(req: ApiRequest) -> User:
    if req.user is None:  # routes with Auth.USER or Auth.ADMIN always carry one
        raise RuntimeError(f"{req.method} {req.path} reached a user handler without a user")
    return req.user


def _runner_filters(req: ApiRequest, *, scopes: Sequence[str] | None) -> RunnerFilters:
    """The listing filters, validated as Grape validates them (lib/api/ci/runners.rb ``filter_params``): every
    value outside its list is named in one 400, in the order the parameters are declared. ``scopes`` are the
    deprecated ``scope`` values this listing takes (``None``: it has no such parameter)."""
    problems: list[str] = []

    def pick(key: str, allowed: Sequence[str]) -> str | None:
        value = p_str(req.params, key)
        if value is not None and value not in allowed:
            problems.append(f"{key} does not have a valid value")
            return None
        return value

    scope = pick("scope", RUNNER_SCOPES) if scopes is not None else None
    runner_type = pick("type", RUNNER_TYPES)
    try:
        paused = p_bool(req.params, "paused")
    except BadRequestError:
        problems.append("paused is invalid")
        paused = None
    status = pick("status", RUNNER_FILTER_STATUSES)
    if problems:
        raise BadRequestError(", ".join(problems))
    if scopes is not None and scope is not None and scope not in scopes:
        # filter_runners' own check, after Grape's: a known scope this listing does not take.
        raise MessageError(400, "Scope contains invalid value")
    return RunnerFilters(
        runner_type=None if runner_type is None else RunnerType(runner_type),
        status=status,
        paused=paused,
        tag_list=p_tags(req.params) or [],
        scope=scope,
    )


def _access_level(params: Mapping[str, Any], key: str) -> int:
    level = p_int(params, key)
    return MAINTAINER_ACCESS if level is None else level


def _pid(req: ApiRequest) -> str:
    """A project :id, which GitLab also accepts as the URL-encoded ``namespace/path``."""
    return req.path_params["id"]


def _rid(req: ApiRequest) -> int:
    return _int_param(req, "id")


def _hook_changes(params: Mapping[str, Any], *, creating: bool) -> HookChanges:
    flags: dict[str, bool] = {}
    for key in params:
        if key.endswith("_events") or key == "enable_ssl_verification":
            flag = p_bool(params, key)
            if flag is not None:
                flags[key] = flag
    return HookChanges(
        url=p_str(params, "url", required=creating),
        token=p_str(params, "token"),
        signing_token=p_str(params, "signing_token"),
        name=p_str(params, "name"),
        description=p_str(params, "description"),
        flags=flags,
    )


def _job_specs(raw: Any) -> list[JobSpec]:
    """The emulator's stand-in for .gitlab-ci.yml: ``"jobs": [{"name", "stage", "tags", "script"}]``."""
    if not isinstance(raw, list) or not raw:
        raise BadRequestError("jobs is missing")
    return [_job_spec(item) for item in raw]


def _job_spec(item: Any) -> JobSpec:
    if not isinstance(item, Mapping) or not item.get("name"):
        raise BadRequestError("jobs[name] is missing")
    return JobSpec(
        name=str(item["name"]),
        stage=str(item.get("stage") or "test"),
        tags=tuple(p_tags(item, "tags") or ()),
        allow_failure=bool(p_bool(item, "allow_failure")),
        when=p_enum(item, "when", When) or When.ON_SUCCESS,
        script=_script(item.get("script")),
    )


def _script(raw: Any) -> tuple[str, ...]:
    """``script:`` as .gitlab-ci.yml takes it: one line or a list of lines (none given: ``DEFAULT_SCRIPT``)."""
    if raw is None:
        return DEFAULT_SCRIPT
    lines = [raw] if isinstance(raw, str) else raw
    if not isinstance(lines, list) or not lines or not all(isinstance(line, str) for line in lines):
        raise BadRequestError("jobs[script] is invalid")
    return tuple(lines)


# ---------------------------------------------------------------------------------------------------------
# Webhook delivery
# ---------------------------------------------------------------------------------------------------------


def sign(signing_token: str, message_id: str, timestamp: int, body: bytes) -> str:
    """The Standard Webhooks ``webhook-signature`` value GitLab sends when a hook has a signing token."""
    key = base64.b64decode(signing_token.removeprefix(SIGNING_TOKEN_PREFIX))
    digest = hmac.new(key, f"{message_id}.{timestamp}.".encode() + body, sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class WebhookDispatcher:
    """Sends queued events from a pool of workers, each once. As with Sidekiq, deliveries have no order.

    WebHookService#execute rescues transport errors and takes any answer as the end of the execution, so
    WebHookWorker's Sidekiq retries never redeliver a hook that failed: the execution is logged and done.

    The executions of a job's "created" Job Hook can be held back ``created_delay`` seconds. GitLab executes a
    build's hooks as Sidekiq jobs (``Ci::Build#execute_hooks`` hands each hook to WebHookWorker), which nothing
    orders, so a busy queue can run the creation's execution after those of the job's later transitions and a
    receiver may hear "created" after "pending", "running" or even "success". The body is still the snapshot taken
    at creation.
    """

    def __init__(
        self,
        model: GitLabModel,
        *,
        workers: int,
        timeout: float,
        user_agent: str,
        instance_url: Callable[[], str],
        stopping: threading.Event,
        created_delay: float = 0.0,
    ) -> None:
        self._model = model
        self._workers = workers
        self._timeout = timeout
        self._user_agent = user_agent
        self._instance_url = instance_url
        self._stopping = stopping
        self._queue: Queue[OutgoingEvent | None] = Queue()
        # Shares the model's lock: the count of unfinished deliveries is part of the emulator's state.
        self._idle = threading.Condition(model.lock)
        self._unfinished = 0
        self._threads: list[threading.Thread] = []
        # Held-back executions, (due on the monotonic clock, arrival number, event), released by their own thread.
        self._created_delay = created_delay
        self._held: list[tuple[float, int, OutgoingEvent]] = []
        self._held_changed = threading.Condition()
        self._arrivals = itertools.count()
        self._releasing = False
        self._releaser: threading.Thread | None = None

    def start(self) -> None:
        for n in range(self._workers):
            thread = threading.Thread(target=self._work, name=f"gitlab-emulator-webhook-{n}", daemon=True)
            thread.start()
            self._threads.append(thread)
        with self._held_changed:
            self._releasing = True
        self._releaser = threading.Thread(target=self._release_held, name="gitlab-emulator-webhook-held", daemon=True)
        self._releaser.start()

    def stop(self) -> None:
        with self._held_changed:
            self._releasing = False
            self._held_changed.notify_all()
        if self._releaser is not None:
            self._releaser.join()
            self._releaser = None
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()
        self._threads.clear()

    def set_created_delay(self, seconds: float) -> None:
        """Hold back the executions of "created" Job Hooks enqueued from now on by ``seconds`` (0: none)."""
        with self._held_changed:
            self._created_delay = seconds

    def enqueue(self, event: OutgoingEvent) -> None:
        with self._idle:
            self._unfinished += 1
        with self._held_changed:
            delay = self._created_delay if event.build_status == JobStatus.CREATED.value else 0.0
            if delay > 0:
                heapq.heappush(self._held, (time.monotonic() + delay, next(self._arrivals), event))
                self._held_changed.notify_all()
                return
        self._queue.put(event)

    def _release_held(self) -> None:
        with self._held_changed:
            while self._releasing:
                now = time.monotonic()
                while self._held and self._held[0][0] <= now:
                    self._queue.put(heapq.heappop(self._held)[2])
                self._held_changed.wait(self._held[0][0] - now if self._held else None)
            # On stop what is still held goes to the workers, which drop it like anything else queued then.
            while self._held:
                self._queue.put(heapq.heappop(self._held)[2])

    def wait_idle(self, timeout: float) -> None:
        with self._idle:
            if not self._idle.wait_for(lambda: self._unfinished == 0, timeout):
                raise TimeoutError(f"{self._unfinished} webhook deliveries still unfinished after {timeout}s")

    def _work(self) -> None:
        with requests.Session() as session:
            session.trust_env = False  # a proxy from the environment must not sit between us and loopback
            while (event := self._queue.get()) is not None:
                try:
                    # On stop, drop what is queued rather than send it; a hook disabled (or deleted) since the
                    # event was queued is not executed either (WebHookWorker, WebHookService#execute).
                    if not self._stopping.is_set() and self._model.hook_executable(event.target.hook_id):
                        self.execute(event, session)
                except Exception:  # a worker must survive anything one delivery does
                    log.exception("webhook delivery to %s crashed", event.target.url)
                finally:
                    with self._idle:
                        self._unfinished -= 1
                        self._idle.notify_all()

    def execute(self, event: OutgoingEvent, session: requests.Session | None = None) -> Delivery:
        """Send one execution and log it (which updates the hook's failure state); the logged row."""
        if session is not None:
            return self._model.log_execution(self._send(session, event))
        with requests.Session() as own:
            own.trust_env = False
            return self._model.log_execution(self._send(own, event))

    def _send(self, session: requests.Session, event: OutgoingEvent) -> Delivery:
        target = event.target
        webhook_uuid = str(uuid.uuid4())  # WebHookService#build_headers: a new one for every request
        headers = {
            "Content-Type": "application/json",
            "User-Agent": self._user_agent,
            "X-Gitlab-Event": event.event,
            "X-Gitlab-Instance": self._instance_url(),
            "X-Gitlab-Webhook-UUID": webhook_uuid,
            "X-Gitlab-Event-UUID": event.event_uuid,
            "Idempotency-Key": event.idempotency_key,
        }
        if target.token is not None:
            headers["X-Gitlab-Token"] = target.token
        if target.signing_token is not None:
            timestamp = int(time.time())  # of this request, so a receiver's freshness check holds on a resend
            headers["webhook-id"] = event.idempotency_key
            headers["webhook-timestamp"] = str(timestamp)
            signature = sign(target.signing_token, event.idempotency_key, timestamp, event.body)
            headers["webhook-signature"] = signature
        started = time.monotonic()
        sent_at = time.time()
        status: int | None = None
        error: str | None = None
        response_headers: dict[str, str] = {}
        response_body = ""
        try:
            response = session.post(
                target.url,
                data=event.body,
                headers=headers,
                timeout=self._timeout,
                verify=target.enable_ssl_verification,
                allow_redirects=False,  # GitLab does not follow redirects from hook receivers
            )
            status = response.status_code
            response_headers = dict(response.headers)
            response_body = response.content[:RESPONSE_BODY_SIZE_LIMIT].decode("utf-8", "replace")
        except requests.Timeout:
            error = "timeout"
        except requests.RequestException as exc:
            error = f"{type(exc).__name__}: {exc}"
        # The log never shows the secret token (WebHooks::LogExecutionService).
        logged_headers = {**headers, "X-Gitlab-Token": "[REDACTED]"} if "X-Gitlab-Token" in headers else headers
        return Delivery(
            hook_id=target.hook_id,
            url=target.url,
            event=event.event,
            event_uuid=event.event_uuid,
            webhook_uuid=webhook_uuid,
            idempotency_key=event.idempotency_key,
            status_code=status,
            error=error,
            sent_at=sent_at,
            duration=time.monotonic() - started,
            payload=json.loads(event.body),
            request_headers=logged_headers,
            response_headers=response_headers,
            response_body=response_body,
        )


# ---------------------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], api: GitLabApi, lock: threading.RLock) -> None:
        self.api = api
        self._lock = lock
        # Open keep-alive connections, so stop() can cut them: a client must not keep talking to a stopped
        # emulator through a pooled connection.
        self._connections: set[socket.socket] = set()
        super().__init__(address, _RequestHandler)
        host, port = cast(tuple[str, int], self.server_address[:2])
        self.base_url = f"http://{host}:{port}"

    def track(self, connection: socket.socket, *, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)

    def close_connections(self) -> None:
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (a timeout during an injected delay, a stop) are normal here.
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class _RequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT
    server_version = "gitlab-emulator"

    def setup(self) -> None:
        super().setup()
        self._emulator().track(self.connection, open_=True)

    def finish(self) -> None:
        self._emulator().track(self.connection, open_=False)
        with contextlib.suppress(OSError):
            super().finish()

    def _emulator(self) -> _Server:
        return cast(_Server, self.server)

    def do_GET(self) -> None:
        self._serve()

    def do_POST(self) -> None:
        self._serve()

    def do_PUT(self) -> None:
        self._serve()

    def do_DELETE(self) -> None:
        self._serve()

    def do_PATCH(self) -> None:
        self._serve()

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        server = self._emulator()
        host = self.headers.get("Host")
        base_url = f"http://{host}" if host else server.base_url
        headers = CaseInsensitiveDict(self.headers.items())
        try:
            response = server.api.handle(self.command, self.path, headers, body, base_url)
        except Exception:  # handler boundary: answer like GitLab would rather than drop the connection
            log.exception("emulator failed on %s %s", self.command, self.path)
            response = message(500)
        payload, content_type = response.encode()
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            if response.status != HTTPStatus.NO_CONTENT:
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if payload and response.status != HTTPStatus.NO_CONTENT:
                self.wfile.write(payload)
        except OSError:
            # The client gave up (its timeout during an injected delay): nothing left to answer.
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s - %s", self.address_string(), format % args)


# ---------------------------------------------------------------------------------------------------------
# The public object
# ---------------------------------------------------------------------------------------------------------


class GitLabEmulator:
    """A GitLab on loopback: ``start()`` it, point python-gitlab at ``url``, read ``deliveries``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        admin_token: str = "glpat-sandbox-admin",  # noqa: S107 - the sandbox's well-known dummy token
        version: str = "17.9.0",
        legacy_timestamps: bool = False,
        delivery_workers: int = 8,
        webhook_timeout: float = 10.0,
        clock: Clock = utcnow,
        auto_disabling: bool = True,
        stuck_jobs_interval: float = STUCK_JOBS_INTERVAL,
        created_hook_delay: float = 0.0,
    ) -> None:
        """``clock`` is GitLab's idea of now (runner contact and staleness, job timestamps, a hook's backoff, which
        jobs are stuck); ``auto_disabling`` is GitLab's ``auto_disabling_web_hooks`` flag (on at GitLab.com; off by
        default on self-managed instances). ``stuck_jobs_interval`` is how many real seconds pass between the
        passes of StuckCiJobsWorker, which drop jobs by ``clock``'s time (GitLab's cron runs it hourly: a test
        moving ``clock`` wants it far more often). ``created_hook_delay`` holds back the executions of every
        "created" Job Hook by that many real seconds, as a busy Sidekiq can (see ``set_created_hook_delay``)."""
        self._host = host
        self._port = port
        self.admin_token = admin_token
        self._stopping = threading.Event()
        self._model = GitLabModel(legacy_timestamps=legacy_timestamps, clock=clock, auto_disabling=auto_disabling)
        self._model.add_access_token(admin_token, admin=True, scopes=(API_SCOPE,), name="admin")
        self._api = GitLabApi(self._model, version=version, stopping=self._stopping)
        self._model.signing_honoured = self._api.signing_honoured
        self._model.hook_token_fields = parse_version(version) >= SIGNING_TOKEN_SINCE
        self.version = version
        self._dispatcher = WebhookDispatcher(
            self._model,
            workers=delivery_workers,
            timeout=webhook_timeout,
            user_agent=f"GitLab/{version}",
            instance_url=lambda: self.url,
            stopping=self._stopping,
            created_delay=created_hook_delay,
        )
        self._model.set_event_sink(self._dispatcher.enqueue)
        self._api.set_executor(self._dispatcher.execute)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._stuck_jobs_interval = stuck_jobs_interval
        self._stuck_jobs_thread: threading.Thread | None = None
        self._url = ""

    # -- lifecycle --

    def start(self) -> Self:
        if self._server is not None:
            raise RuntimeError("the GitLab emulator is already running")
        self._stopping.clear()
        self._server = _Server((self._host, self._port), self._api, self._model.lock)
        self._url = self._server.base_url
        self._model.external_url = self._url
        self._dispatcher.start()
        self._thread = threading.Thread(
            # A short poll keeps stop() quick: shutdown() waits for the serving loop to notice.
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="gitlab-emulator",
            daemon=True,
        )
        self._thread.start()
        self._stuck_jobs_thread = threading.Thread(
            target=self._drop_stuck_jobs_periodically, name="gitlab-emulator-stuck-jobs", daemon=True
        )
        self._stuck_jobs_thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.close_connections()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join()
        if self._stuck_jobs_thread is not None:
            self._stuck_jobs_thread.join()
        self._dispatcher.stop()
        self._server = None
        self._thread = None
        self._stuck_jobs_thread = None

    def _drop_stuck_jobs_periodically(self) -> None:
        """StuckCiJobsWorker's cron, one pass every ``stuck_jobs_interval`` seconds until the emulator stops."""
        while not self._stopping.wait(self._stuck_jobs_interval):
            try:
                self._model.drop_stuck_jobs()
            except Exception:  # the worker must outlive a failed pass, as the next cron run does
                log.exception("dropping stuck jobs failed")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``; the API lives under ``/api/v4``."""
        if not self._url:
            raise RuntimeError("the GitLab emulator is not started")
        return self._url

    # -- users and their tokens --

    def add_token(
        self,
        token: str,
        *,
        admin: bool = False,
        scopes: Sequence[str] = (API_SCOPE,),
        expires_at: date | None = None,
        name: str = "fleet",
    ) -> None:
        """Accept ``token``, a personal access token with ``scopes``: an administrator's, or (default) that of a
        user owning every group and project but no administrator, as a group- or project-runner fleet's token
        is. A request its scopes do not cover gets 403 ``insufficient_scope``; from ``expires_at`` on it gets 401."""
        self._model.add_access_token(token, admin=admin, scopes=scopes, expires_at=expires_at, name=name)

    def revoke_token(self, token: str) -> None:
        """``token`` gets 401 ("Token was revoked") from now on."""
        self._model.revoke_access_token(token)

    # -- instance administration --

    def enable_feature(self, name: str) -> None:
        """An administrator's ``Feature.enable(:name)``, e.g. ``webhook_signing_token`` (which only GitLab 19.0
        and later know)."""
        with self._model.lock:
            self._model.features.add(name)

    def disable_feature(self, name: str) -> None:
        """An administrator's ``Feature.disable(:name)``."""
        with self._model.lock:
            self._model.features.discard(name)

    # -- seeding and driving state from Python --

    def create_group(self, full_path: str) -> int:
        """A group (the id of an existing one at that path); as an administrator seeds it, not through the API."""
        return self._model.create_group(full_path)

    def create_project(self, path_with_namespace: str) -> int:
        namespace, _, path = path_with_namespace.rpartition("/")
        project = self._model.create_project(path=path, name=path, namespace_path=namespace or None)
        return int(project["id"])

    def create_pipeline(
        self,
        project_id: int,
        jobs: Sequence[JobSpec | Mapping[str, Any]],
        ref: str = "main",
        stages: Sequence[str] | None = None,
        *,
        tag: bool = False,
    ) -> int:
        """Jobs as ``JobSpec`` or as the HTTP extension's dicts (``{"name", "stage", "tags", "when", "script"}``),
        in ``stages`` order (GitLab's default ``build``, ``test``, ``deploy`` when ``None``), for the branch ``ref``
        (the tag ``ref`` with ``tag``). Its jobs are protected when the ref is (``protect_branch``,
        ``protect_tag``; the default branch ``main`` is protected from the start)."""
        specs = [job if isinstance(job, JobSpec) else _job_spec(job) for job in jobs]
        return int(self._model.create_pipeline(project_id, ref, specs, stages, tag=tag)["id"])

    def protect_branch(self, project_id: int, name: str) -> None:
        """Protect a branch or wildcard pattern, as ``POST /projects/:id/protected_branches`` does."""
        self._model.protect_branch(project_id, name)

    def protect_tag(self, project_id: int, name: str) -> None:
        """Protect a tag or wildcard pattern of tags."""
        self._model.protect_tag(project_id, name)

    def drop_stuck_jobs(self) -> list[int]:
        """Run one pass of StuckCiJobsWorker now, at the emulator's clock; the ids of the jobs it dropped."""
        return self._model.drop_stuck_jobs()

    def set_job_status(
        self,
        project_id: int,
        job_id: int,
        status: str,
        failure_reason: str | None = None,
        runner_id: int | None = None,
    ) -> None:
        self._model.set_job_status(
            project_id, job_id, JobStatus(status), failure_reason=failure_reason, runner_id=runner_id
        )

    def job(self, project_id: int, job_id: int) -> dict[str, Any]:
        return self._model.get_job(project_id, job_id)

    def retry_job(self, project_id: int, job_id: int) -> dict[str, Any]:
        """A user's "Retry" of a finished job (``POST /projects/:id/jobs/:job_id/retry``): the new job."""
        return self._model.retry_job(project_id, job_id)

    def job_trace(self, project_id: int, job_id: int) -> bytes:
        """The job's log as its runner uploaded it."""
        return self._model.job_trace(project_id, job_id)

    def jobs_of_pipeline(self, project_id: int, pipeline_id: int) -> list[dict[str, Any]]:
        """The pipeline's jobs in creation order."""
        return sorted(
            self._model.list_pipeline_jobs(project_id, pipeline_id, (), include_retried=True),
            key=lambda j: int(j["id"]),
        )

    def runners(self) -> list[dict[str, Any]]:
        return self._model.all_runner_details()

    # -- observing --

    @property
    def deliveries(self) -> list[Delivery]:
        """Every hook execution so far (resends included), oldest first (a snapshot)."""
        return self._model.deliveries()

    def resend(self, delivery: Delivery | int, *, event_uuid: str | None = None) -> Delivery:
        """Resend a logged execution now, as the hook's "Resend request" button does: the same payload and
        Idempotency-Key, to the hook as it is now; the new execution's log row. ``GitLabEmulatorError`` (422)
        when the hook's URL changed or the hook is disabled, as GitLab refuses then."""
        logged = delivery if isinstance(delivery, Delivery) else self._logged(delivery)
        hook = self._model.hook_project(logged.hook_id)
        event = self._model.resend_execution(hook, logged.hook_id, logged.id, event_uuid)
        return self._dispatcher.execute(event)

    def hook(self, project_id: int, hook_id: int) -> dict[str, Any]:
        """The hook as ``GET /projects/:id/hooks/:hook_id`` shows it (``alert_status``, ``disabled_until`` ...)."""
        return self._model.get_hook(project_id, hook_id)

    def _logged(self, log_id: int) -> Delivery:
        found = [d for d in self._model.deliveries() if d.id == log_id]
        if not found:
            raise KeyError(f"no hook execution logged with id {log_id}")
        return found[0]

    def hold_job_request(self, runner_id: int) -> RequestHold:
        """Hold the runner's next job request between GitLab's active check and its assignment of a job (see
        ``GitLabModel.hold_job_request``); ``hold.reached`` says it is there, ``hold.release()`` lets it go on."""
        return self._model.hold_job_request(runner_id)

    def set_created_hook_delay(self, seconds: float) -> None:
        """Hold back the executions of "created" Job Hooks of jobs created from now on by ``seconds`` (0: none),
        so that they can arrive after the job's later hooks, as they can from GitLab's Sidekiq."""
        self._dispatcher.set_created_delay(seconds)

    def wait_for_deliveries(self, timeout: float = 10.0) -> None:
        """Block until every queued webhook has been delivered or given up on; ``TimeoutError`` otherwise."""
        self._dispatcher.wait_idle(timeout)

    @property
    def calls(self) -> Counter[tuple[str, str]]:
        """``(method, route template)`` -> requests, e.g. ``("POST", "/user/runners")`` (a snapshot)."""
        return self._api.calls()

    # -- fault injection at the wire --

    def fail_next(
        self,
        method: str,
        path_pattern: str,
        *,
        status: int = 500,
        count: int = 1,
        delay: float = 0.0,
        body: str | None = None,
        after_processing: bool = False,
    ) -> None:
        """Answer the next ``count`` requests whose method matches (``"*"`` for any) and whose path after
        ``/api/v4`` fully matches ``path_pattern`` with ``status``, after ``delay`` seconds. A delay longer
        than the client's timeout is a timeout. Requests that hit a fault never reach the model, unless
        ``after_processing``: then the request takes effect and only its answer is lost."""
        fault = Fault(method.upper(), re.compile(path_pattern), status, count, delay, body, after_processing)
        self._api.add_fault(fault)

    def clear_faults(self) -> None:
        """Forget every injected fault not yet used up (GitLab is back)."""
        self._api.clear_faults()

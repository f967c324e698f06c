"""What fleetctl tells a person about an error they can act on, in one line.

Every command talks to AWS and most to GitLab; what goes wrong there is seldom a bug of ours but something the
operator mends: no credentials, the wrong region or endpoint, a token refused, a resource not made yet. The
command group (``fleetctl.cli.FleetctlGroup``) asks :func:`explain` for the line and prints it instead of a
traceback; anything :func:`explain` does not know is a bug, and keeps its traceback.
"""

from __future__ import annotations

import os

# AWS error codes that mean the credentials or their permissions were refused.
_REFUSED = {
    "AccessDenied": "the credentials may not do this",
    "AccessDeniedException": "the credentials may not do this",
    "UnauthorizedOperation": "the credentials may not do this",
    "AuthorizationError": "the credentials may not do this",
    "UnrecognizedClientException": "AWS does not know the access key",
    "InvalidClientTokenId": "AWS does not know the access key",
    "InvalidAccessKeyId": "AWS does not know the access key",
    "SignatureDoesNotMatch": "the secret access key does not match the access key",
    "ExpiredToken": "the session credentials expired",
    "ExpiredTokenException": "the session credentials expired",
    "RequestExpired": "the request expired: check the machine's clock",
    "AuthFailure": "AWS refused the credentials",
}
# AWS error codes that mean a resource the stage needs does not exist (yet).
_MISSING = {
    "ResourceNotFoundException",
    "ParameterNotFound",
    "NoSuchEntity",
    "QueueDoesNotExist",
    "AWS.SimpleQueueService.NonExistentQueue",
    "NoSuchBucket",
    "RepositoryNotFoundException",
    "InvalidLaunchTemplateName.NotFoundException",
    "InvalidLaunchTemplateId.NotFound",
}


def explain(exc: BaseException) -> str | None:
    """One line naming what is wrong and what to do, or None for an error that is not the operator's to mend."""
    for explainer in (_botocore, _client_error, _gitlab, _requests, _fleet):
        line = explainer(exc)
        if line is not None:
            return line
    return None


def _botocore(exc: BaseException) -> str | None:
    from botocore import exceptions as botocore

    if isinstance(exc, botocore.NoCredentialsError | botocore.PartialCredentialsError):
        return (
            "no AWS credentials found: set AWS_PROFILE (then 'aws sso login' if it uses SSO) or "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run 'aws configure'"
        )
    if isinstance(exc, botocore.NoRegionError):
        return "no AWS region: set AWS_REGION (or the stage file's region)"
    if isinstance(exc, botocore.EndpointConnectionError | botocore.ConnectTimeoutError):
        endpoint = getattr(exc, "kwargs", {}).get("endpoint_url", "")
        if os.environ.get("AWS_ENDPOINT_URL"):
            return f"cannot reach AWS at {endpoint} (set by AWS_ENDPOINT_URL): is that service running?"
        return f"cannot reach AWS at {endpoint}: check the stage file's region and the network"
    if isinstance(exc, botocore.ReadTimeoutError):
        return f"AWS did not answer in time ({getattr(exc, 'kwargs', {}).get('endpoint_url', '')}): try again"
    if isinstance(exc, botocore.TokenRetrievalError | botocore.SSOError):
        return f"AWS credentials could not be refreshed ({exc}): run 'aws sso login'"
    return None


def _client_error(exc: BaseException) -> str | None:
    from botocore.exceptions import ClientError

    from chalicelib.aws import error_code

    if not isinstance(exc, ClientError):
        return None
    code = error_code(exc)
    message = str(exc.response.get("Error", {}).get("Message", "")).strip()
    operation = exc.operation_name
    said = f"{code}: {message}" if message else code
    if code in _REFUSED:
        return (
            f"AWS refused {operation} ({said}): {_REFUSED[code]}; use credentials of the stage's account "
            "with the operator's permissions (README.md, Deploying)"
        )
    if code in _MISSING:
        return (
            f"not found in AWS: {operation} answered {said}; run 'fleetctl bootstrap --config <stage file>' for the "
            "stage, or check --config and the region"
        )
    if code in ("ThrottlingException", "Throttling", "RequestLimitExceeded", "TooManyRequestsException"):
        return f"AWS throttled {operation} ({code}) past the retries: try again in a minute"
    return f"AWS refused {operation}: {said}"


def _gitlab(exc: BaseException) -> str | None:
    try:
        from gitlab import exceptions as gitlab
    except ImportError:  # pragma: no cover - python-gitlab is a dependency
        return None
    if isinstance(exc, gitlab.GitlabAuthenticationError) or (
        isinstance(exc, gitlab.GitlabError) and exc.response_code == 401
    ):
        return (
            f"GitLab refused the token (401: {exc.error_message}): pass a valid one with --gitlab-token or "
            "GITLAB_TOKEN (or store the fleet's with GITLAB_TOKEN=... fleetctl bootstrap)"
        )
    if isinstance(exc, gitlab.GitlabError) and exc.response_code == 403:
        return f"GitLab forbids it (403: {exc.error_message}): the token lacks the scope or role this needs"
    if isinstance(exc, gitlab.GitlabError) and exc.response_code == 404:
        return f"GitLab has no such project, group or hook (404: {exc.error_message}), or the token may not see it"
    if isinstance(exc, gitlab.GitlabError) and exc.response_code is not None:
        return f"GitLab answered HTTP {exc.response_code}: {exc.error_message}"
    return None


def _requests(exc: BaseException) -> str | None:
    import requests

    if not isinstance(exc, requests.RequestException):
        return None
    request = getattr(exc, "request", None)
    url = getattr(request, "url", None) or ""
    where = url.split("/api/v4", 1)[0] if url else "GitLab"
    if isinstance(exc, requests.ConnectionError | requests.Timeout):
        return f"cannot reach GitLab at {where}: check gitlab.url in the stage file (or --gitlab-url) and the network"
    return f"the request to {where} failed: {type(exc).__name__}"


def _fleet(exc: BaseException) -> str | None:
    from chalicelib.errors import RunnerFleetError

    if isinstance(exc, RunnerFleetError):
        return str(exc)
    return None

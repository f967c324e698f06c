"""EC2 keeps the ``Architecture`` an image was registered with; moto's RegisterImage drops it, so DescribeImages
answers a registered image with no architecture at all.

Source: the RegisterImage API reference, https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_RegisterImage.html
(``Architecture``: "Default: For Amazon EBS-backed AMIs, i386"), and the ``Image`` data type,
https://docs.aws.amazon.com/AWSEC2/latest/APIReference/API_Image.html (``architecture``, one of ``i386 | x86_64 |
arm64 | x86_64_mac | arm64_mac``). Bootstrap and ``fleetctl ami publish`` read it to match an AMI to instance
types, so without it every image the sandbox registers would be of no architecture.
"""

from __future__ import annotations

import re
import threading
from xml.etree import ElementTree

from fleetctl.sandbox.aws_shim import AwsRequest, AwsResponse, Forward, Rule

__all__ = ["RegisteredImageArchitecture"]

DEFAULT_ARCHITECTURE = "i386"
_IMAGE_ID = re.compile(rb"<imageId>(ami-[0-9a-f]+)</imageId>")


class RegisteredImageArchitecture(Rule):
    """RegisterImage remembers the image's ``Architecture`` (``i386`` when the call names none), and
    DescribeImages puts it into each answer item of such an image that lacks one. Filtering DescribeImages by
    ``architecture`` still sees moto's (absent) value."""

    name = "ec2-image-architecture"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._architectures: dict[tuple[str, str], str] = {}

    def handle(self, request: AwsRequest, forward: Forward) -> AwsResponse:
        if request.service != "ec2" or request.operation not in ("RegisterImage", "DescribeImages"):
            return forward(request)
        response = forward(request)
        if response.status != 200:
            return response
        if request.operation == "RegisterImage":
            found = _IMAGE_ID.search(response.body)
            if found is not None:
                architecture = request.params.get("Architecture") or DEFAULT_ARCHITECTURE
                with self._lock:
                    self._architectures[(request.region, found.group(1).decode())] = architecture
            return response
        body = self._annotate(request, response.body)
        return AwsResponse(response.status, _with_length(response.headers, body), body)

    def _annotate(self, request: AwsRequest, body: bytes) -> bytes:
        # Parsed, not matched: an image item holds nested <item>s (its block device mappings).
        root = ElementTree.fromstring(body)  # noqa: S314 - moto's own answer, not outside input
        namespace = root.tag.partition("}")[0].lstrip("{")
        tag = f"{{{namespace}}}" if namespace else ""
        changed = False
        for item in root.findall(f"{tag}imagesSet/{tag}item"):
            if item.find(f"{tag}architecture") is not None:
                continue
            with self._lock:
                architecture = self._architectures.get((request.region, item.findtext(f"{tag}imageId") or ""))
            if architecture is not None:
                ElementTree.SubElement(item, f"{tag}architecture").text = architecture
                changed = True
        if not changed:
            return body
        return bytes(
            ElementTree.tostring(root, encoding="utf-8", xml_declaration=True, default_namespace=namespace or None)
        )

    def reset(self) -> None:
        with self._lock:
            self._architectures.clear()


def _with_length(headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
    kept = [(key, value) for key, value in headers if key.lower() != "content-length"]
    return [*kept, ("Content-Length", str(len(body)))]

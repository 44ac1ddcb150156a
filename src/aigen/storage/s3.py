# botocore ships no types; this stays correct whether or not pyproject lists it as untyped.
# mypy: disable-error-code="import-untyped"
"""The S3 store: any server that speaks the plain S3 API (MinIO, AWS S3, Cloudflare R2, Ceph).

Credentials come from the storage URL, else botocore's usual chain (`AWS_ACCESS_KEY_ID`,
`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, profiles, instance roles). Checksums are only
computed or checked when an operation requires them: the CRC32 trailers that botocore adds
by default since 1.36 are refused by many S3-compatible servers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import AsyncExitStack
from datetime import datetime, timedelta
from typing import Any, Literal

import aioboto3
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError, HTTPClientError

from aigen.clock import utcnow

from .base import StorageError, StorageUnavailableError, check_key

AddressingStyle = Literal["auto", "path", "virtual"]

# SigV4 presigned URLs live at most seven days.
MAX_URL_SECONDS = 7 * 24 * 3600


class S3Store:
    """Assets as objects in one bucket, under an optional key prefix; URLs are presigned GETs."""

    def __init__(
        self,
        bucket: str,
        *,
        prefix: str = "",
        endpoint_url: str | None = None,
        public_endpoint_url: str | None = None,
        region: str | None = None,
        addressing_style: AddressingStyle | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
        session_token: str | None = None,
        create_bucket: bool = True,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 3,
    ) -> None:
        """`public_endpoint_url` signs URLs for a host other than the one the workers use
        (MinIO inside a container network, say); `addressing_style` defaults to `path`
        when an endpoint is given, since self-hosted servers rarely have wildcard DNS.
        """
        if not bucket:
            raise ValueError("an S3 store needs a bucket")
        self.bucket = bucket
        self.prefix = check_key(prefix.strip("/")) if prefix.strip("/") else ""
        self.endpoint_url = endpoint_url
        self.public_endpoint_url = public_endpoint_url
        self.region = region
        self.addressing_style: AddressingStyle = addressing_style or (
            "path" if endpoint_url else "auto"
        )
        self._create_bucket = create_bucket
        self._session = aioboto3.Session(
            aws_access_key_id=access_key_id,
            aws_secret_access_key=secret_access_key,
            aws_session_token=session_token,
            region_name=region,
        )
        self._config = AioConfig(
            signature_version="s3v4",
            s3={"addressing_style": self.addressing_style},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
        )
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._signer: Any = None

    def object_key(self, key: str) -> str:
        """The S3 object key that holds asset `key` (the prefix joined in front)."""
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    async def start(self) -> None:
        """Open the client (kept for the store's life) and create the bucket when absent."""
        if self._stack is not None:
            return
        stack = AsyncExitStack()
        try:
            self._client = await stack.enter_async_context(
                self._session.client("s3", endpoint_url=self.endpoint_url, config=self._config)
            )
            # Signing is offline, so a second client for the public host costs no connection.
            self._signer = self._client
            if self.public_endpoint_url:
                self._signer = await stack.enter_async_context(
                    self._session.client(
                        "s3", endpoint_url=self.public_endpoint_url, config=self._config
                    )
                )
            if self._create_bucket:
                await self._ensure_bucket()
        except BaseException:
            await stack.aclose()
            self._client = self._signer = None
            raise
        self._stack = stack

    async def _ensure_bucket(self) -> None:
        with _translate(f"bucket {self.bucket!r}"):
            try:
                await self._client.head_bucket(Bucket=self.bucket)
                return
            except ClientError as exc:
                if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                    raise
            params: dict[str, Any] = {"Bucket": self.bucket}
            region = self._client.meta.region_name
            # us-east-1 is the one region that refuses an explicit location constraint.
            if region and region not in ("us-east-1", "aws-global"):
                params["CreateBucketConfiguration"] = {"LocationConstraint": region}
            try:
                await self._client.create_bucket(**params)
            except ClientError as exc:
                # Another process created it between our look and our create.
                if _code(exc) != "BucketAlreadyOwnedByYou":
                    raise

    async def put(self, key: str, data: bytes, *, content_type: str) -> None:
        with _translate(f"put {key!r}"):
            await self._started.put_object(
                Bucket=self.bucket, Key=self.object_key(key), Body=data, ContentType=content_type
            )

    async def get(self, key: str) -> bytes:
        with _translate(f"get {key!r}"):
            try:
                response = await self._started.get_object(
                    Bucket=self.bucket, Key=self.object_key(key)
                )
            except ClientError as exc:
                if _code(exc) in ("NoSuchKey", "404", "NotFound"):
                    raise KeyError(key) from None
                raise
            async with response["Body"] as body:
                data: bytes = await body.read()
            return data

    async def url(self, key: str, *, expires_in: int) -> tuple[str, datetime]:
        if not 0 < expires_in <= MAX_URL_SECONDS:
            raise ValueError(f"expires_in must be between 1 and {MAX_URL_SECONDS} seconds")
        object_key = self.object_key(key)
        self._check_started()
        # Taken before signing, so the time we report is never later than the real expiry.
        expires_at = utcnow() + timedelta(seconds=expires_in)
        with _translate(f"presign {key!r}"):
            url: str = await self._signer.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": object_key},
                ExpiresIn=expires_in,
            )
        return url, expires_at

    async def ping(self) -> None:
        try:
            await self._started.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise StorageUnavailableError(f"bucket {self.bucket!r} unreachable: {exc}") from exc

    async def aclose(self) -> None:
        stack, self._stack = self._stack, None
        self._client = self._signer = None
        if stack is not None:
            await stack.aclose()

    def _check_started(self) -> None:
        if self._client is None:
            raise RuntimeError("S3Store.start() has not been awaited")

    @property
    def _started(self) -> Any:
        self._check_started()
        return self._client


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


@contextlib.contextmanager
def _translate(action: str) -> Iterator[None]:
    """Turn botocore's errors into the storage error tree (see `base`)."""
    try:
        yield
    except (ConnectionError, HTTPClientError) as exc:
        raise StorageUnavailableError(f"S3 {action}: {exc}") from exc
    except ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        error = StorageUnavailableError if status >= 500 else StorageError
        raise error(f"S3 {action}: {exc}") from exc
    except BotoCoreError as exc:
        raise StorageError(f"S3 {action}: {exc}") from exc

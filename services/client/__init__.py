"""A small async Python client for Xoogify: submit, list, read and follow logs, cancel.

async with XoogifyClient("http://127.0.0.1:8000", token) as xo:
    job = await xo.submit(organization="acme", environment="stg", module_name="hello",
                          module_type="amd64/script", action="APPLY-AUTO")
    async for text in xo.follow_logs(job["build_id"]):
        print(text, end="")
"""

from services.client.http import ApiError, Gap, XoogifyClient

__all__ = ["ApiError", "Gap", "XoogifyClient"]

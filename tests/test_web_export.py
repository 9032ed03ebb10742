"""Add Target Storage on the settings page, in a real browser — written to the target-storage API
contract (`/api/storages/export/gcs`) being built on main; it passes once that API is merged.

Kept apart from tests/test_web.py so the rest stays green on a branch without that API.
"""

from __future__ import annotations

import asyncio

from gateway.state import CATALOG

from .conftest import make_token
from .test_web import WAIT, field_error, gateway, new_page, screenshot_path  # noqa: F401  (gateway is a fixture)

TARGET_PROJECT = "7"


async def test_add_target_storage_and_sync(browser, gateway):  # noqa: F811
    page = await new_page(browser, viewport={"width": 1280, "height": 900})
    admin = make_token("root", admin=True)
    targets = await page.request.get(
        f"{gateway['url']}/api/storages/export/gcs", headers={"Authorization": f"Bearer {admin}"}
    )
    assert targets.status == 200, "this build has no target-storage API (/api/storages/export/gcs) yet"
    # One annotation of the project, so the sync has something to deliver.
    task = gateway["tasks"][TARGET_PROJECT]
    recorded = await page.request.put(
        f"{gateway['url']}/api/tasks/{task}/annotations/1",
        headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
        data='{"result": [{"type": "choices", "value": {"choices": ["cat"]}}]}',
    )
    assert recorded.ok, await recorded.text()
    await page.goto(f"{gateway['url']}/ui/")
    await page.fill("#sign-in-token", admin)
    await page.click("#sign-in-form button[type=submit]")
    await page.locator("#who-name").wait_for(timeout=WAIT)

    await page.click("#add-target")
    dialog = "target-dialog"
    await page.fill("#target-project", TARGET_PROJECT)
    await page.fill("#target-title-input", "Annotations")
    await page.fill("#target-bucket", "no-such-bucket-anywhere")
    await page.fill("#target-prefix", "annotations")
    await page.click(f"#{dialog} [data-action=test]")
    assert "Bucket not found" in await field_error(page, dialog, "bucket")
    await page.fill("#target-bucket", gateway["images"])
    await page.check("#target-can-delete")
    await page.click(f"#{dialog} [data-action=test]")
    await page.locator(f"#{dialog} [data-result=test][data-ok=true]").wait_for(timeout=WAIT)
    await page.click(f"#{dialog} [data-action=save]")

    row = page.locator("#target-table tbody tr", has_text="Annotations")
    await row.wait_for(timeout=WAIT)
    assert f"gs://{gateway['images']}/annotations" in await row.inner_text()
    from gateway.export.worker import ExportWorker

    worker = ExportWorker(gateway["app"][CATALOG])
    running = asyncio.create_task(worker.run())
    try:
        await row.get_by_role("button", name="Sync Annotations").click()
        await row.locator(".status[data-status=completed]").wait_for(timeout=WAIT)
    finally:
        await worker.stop(running)
    assert "1 delivered" in await row.inner_text()
    await page.screenshot(path=screenshot_path("ui-target-storage"))

    page.once("dialog", lambda d: d.accept())
    await row.get_by_role("button", name="Delete Annotations").click()
    await row.wait_for(state="detached", timeout=WAIT)

"""The dashboard in a real browser (Debian's chromium through Playwright) against the real ``jobstate serve
--http-port``: writes made through gRPC show on the page within a second, a job's page shows its executions and
history, a restarted server is followed by "reconnecting" and back to "live" with nothing missed, a reset store
is relisted, and a server that wants a token says so. Every wait is on the page's DOM (Playwright's ``expect``).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import expect

from jobstate.client import Client
from jobstate.v1 import job_state_pb2 as pb

# The dashboard's promise: a change is on the page within a second of its commit.
WITHIN_A_SECOND = 1000
# Starting a page, or reconnecting to a restarted server, is not the promise above: a generous bound.
SLOW = 20_000


def live(page: Any, timeout: float = SLOW) -> None:
    expect(page.locator("#conn")).to_have_attribute("data-state", "live", timeout=timeout)


def row(page: Any, job_id: str) -> Any:
    return page.locator(f'#jobs-body tr[data-job="{job_id}"]')


def shows(page: Any, job_id: str, *, version: int, state: str | None = None) -> None:
    r = row(page, job_id)
    expect(r).to_have_attribute("data-version", str(version), timeout=WITHIN_A_SECOND)
    if state:
        expect(r).to_have_attribute("data-state", state, timeout=WITHIN_A_SECOND)


def test_rows_follow_grpc_writes_within_a_second(make_web_server: Any, page: Any) -> None:
    server = make_web_server()
    with Client(server.target) as c:
        c.create_job("job-before")
        page.goto(server.url)
        live(page)
        shows(page, "job-before", version=1, state="NEW")
        latencies = []

        def step(write: Any, job_id: str, version: int, state: str | None = None) -> None:
            write()
            t0 = time.monotonic()
            shows(page, job_id, version=version, state=state)
            latencies.append(time.monotonic() - t0)

        step(lambda: c.create_job("job-a", timeout=600), "job-a", 1, "NEW")
        step(lambda: c.update_job_state("job-a", "queued", expected_version=1), "job-a", 2, "QUEUED")
        step(lambda: c.create_execution("job-a", "node-a", compute_reference="e1", state="ask_for_bid"), "job-a", 3)
        expect(row(page, "job-a").locator(".c-exec")).to_have_text("1 ASK_FOR_BID")
        step(lambda: c.update_execution("job-a", "e1", state="bid_accepted", status="running"), "job-a", 4)
        step(lambda: c.update_job_state("job-a", "in_progress"), "job-a", 5, "IN_PROGRESS")
        expect(row(page, "job-a").locator(".c-exec")).to_have_text("1 BID_ACCEPTED")
        expect(page.locator('#counts [data-state="IN_PROGRESS"] .n')).to_have_text("1")
        expect(page.locator('#counts [data-state="ALL"] .n')).to_have_text("2")

        c.delete_job("job-before")
        t0 = time.monotonic()
        expect(row(page, "job-before")).to_have_count(0, timeout=WITHIN_A_SECOND)
        latencies.append(time.monotonic() - t0)
        head = c.get_job("job-a").revision
        expect(page.locator("#conn-text")).to_have_text(f"Live · revision {head}", timeout=WITHIN_A_SECOND)
        print(f"write to row: max {max(latencies) * 1000:.0f} ms over {len(latencies)} writes")


def test_filters_by_state_node_and_text(make_web_server: Any, page: Any) -> None:
    server = make_web_server()
    with Client(server.target) as c:
        for i, node in enumerate(["node-a", "node-b", "node-a"]):
            c.create_job(f"build-{i}")
            c.create_execution(f"build-{i}", node, compute_reference=f"x{i}")
        c.update_job_state("build-1", "queued")
        c.create_job("deploy-0")
        page.goto(server.url)
        live(page)
        expect(page.locator("#jobs-body tr")).to_have_count(4)

        page.locator('#counts [data-state="QUEUED"]').click()
        expect(page.locator("#jobs-body tr")).to_have_count(1)
        expect(row(page, "build-1")).to_be_visible()
        assert "state=QUEUED" in page.url
        # A job that enters the filtered state joins the table live.
        c.update_job_state("build-2", "queued")
        expect(row(page, "build-2")).to_be_visible(timeout=WITHIN_A_SECOND)
        page.locator('#counts [data-state="QUEUED"]').click()
        expect(page.locator("#jobs-body tr")).to_have_count(4)

        page.select_option("#filter-node", "node-a")
        expect(page.locator("#jobs-body tr")).to_have_count(2)
        expect(row(page, "build-1")).to_have_count(0)
        page.select_option("#filter-node", "")
        page.locator("#filter-node").blur()
        page.keyboard.press("/")
        expect(page.locator("#filter-text")).to_be_focused()
        page.keyboard.type("deploy")
        expect(page.locator("#jobs-body tr")).to_have_count(1)
        expect(row(page, "deploy-0")).to_be_visible()
        page.fill("#filter-text", "nothing-like-this")
        expect(page.locator("#jobs-empty")).to_contain_text("No job matches the filters (4 jobs in all)")

        # Sorting: by last change (the default: build-2 changed last), then by id.
        page.fill("#filter-text", "")
        expect(page.locator("#jobs-body tr").first).to_have_attribute("data-job", "build-2")
        page.locator("#jobs th", has_text="Job").click()
        expect(page.locator("#jobs-body tr").first).to_have_attribute("data-job", "build-0")
        expect(page.locator("#jobs-body tr").last).to_have_attribute("data-job", "deploy-0")
        assert "sort=id" in page.url


def test_job_page_shows_executions_and_history(make_web_server: Any, page: Any) -> None:
    server = make_web_server()
    with Client(server.target) as c:
        c.create_job("job-h", timeout=3600, comment="submitted")
        c.update_job_state("job-h", "queued", comment="waiting for capacity")
        c.create_execution("job-h", "node-a", compute_reference="e1", state="ask_for_bid", comment="asking node-a")
        c.create_execution("job-h", "node-b", compute_reference="e2", state="ask_for_bid", comment="asking node-b")
        c.update_execution("job-h", "e2", state="ask_for_bid_rejected", status="no capacity")
        c.update_execution("job-h", "e1", state="bid_accepted", status="running")
        c.update_job_state("job-h", "in_progress", comment="running on node-a")
        failed = pb.ExecutionState(state=pb.EXECUTION_STATE_TYPE_FAILED, status="exit 3")
        failed.run_output.exit_code = 3
        failed.run_output.stdout = "step 1 ok\nstep 2 ok\n"
        failed.run_output.stderr = "step 3: disk full"
        mask = ["state", "status", "run_output.exit_code", "run_output.stdout", "run_output.stderr"]
        c.update_execution("job-h", "e1", failed, update_mask=mask)
        c.create_execution("job-h", "node-c", compute_reference="e3", state="bid_accepted", status="retry 1")

        page.goto(server.url)
        live(page)
        with page.expect_request(lambda r: "/jobstate.v1.JobStateService/GetJobHistory" in r.url) as history_call:
            row(page, "job-h").locator("a").click()
        # A read goes out as a plain GET (GetJobHistory is NO_SIDE_EFFECTS): cacheable, visible in access logs.
        assert history_call.value.method == "GET"
        expect(page).to_have_url(re.compile(r"#/job/job-h$"))
        expect(page.locator("#job-title")).to_have_text("job-h")
        entries = list(c.iter_history("job-h"))
        expect(page.locator("#timeline > li")).to_have_count(len(entries))
        for entry in entries:
            expect(page.locator(f'#timeline > li[data-revision="{entry.revision}"]')).to_have_count(1)
        expect(page.locator('#timeline > li[data-revision="1"]')).to_contain_text("Job created in NEW")
        expect(page.locator("#timeline")).to_contain_text("“waiting for capacity”")
        e1 = page.locator('#exec-body tr[data-exec="e1"]')
        expect(e1).to_have_attribute("data-state", "FAILED")
        expect(e1).to_contain_text("node-a")
        expect(e1.locator("td").nth(5)).to_have_text("3")
        # The row opens on its output.
        e1.click()
        detail = page.locator('#exec-body tr[data-detail="e1"]')
        expect(detail.locator("pre").first).to_have_text("step 1 ok\nstep 2 ok\n")
        expect(detail).to_contain_text("step 3: disk full")
        expect(page.locator('#exec-body tr[data-exec="e2"]')).to_contain_text("no capacity")
        expect(page.locator("#lanes .lane")).to_have_count(5)  # the job, three executions, the time axis

        # The page follows the job live: a change adds to the table and the timeline without a reload.
        c.update_execution("job-h", "e3", state="completed", status="results published")
        done = c.update_job_state("job-h", "completed", comment="completed on node-c")
        expect(page.locator('#exec-body tr[data-exec="e3"]')).to_have_attribute(
            "data-state", "COMPLETED", timeout=WITHIN_A_SECOND
        )
        expect(page.locator(f'#timeline > li[data-revision="{done.revision}"]')).to_contain_text(
            "IN_PROGRESS → COMPLETED", timeout=5000
        )

        page.locator("a.back").click()
        live(page)
        expect(row(page, "job-h")).to_have_attribute("data-state", "COMPLETED")
        # A link straight to a job that does not exist says so, at the revision it was checked.
        page.goto(f"{server.url}#/job/nope")
        live(page)
        expect(page.locator(".job-page .empty.big")).to_have_text(f"No job “nope” at revision {done.revision}.")
        # Quiet stretches kept the stream alive (progress bookmarks): it never dropped during this test.
        expect(page.locator("#conn-log")).not_to_contain_text("reconnecting")


def test_a_capped_history_says_how_many_changes_were_dropped(make_web_server: Any, page: Any) -> None:
    server = make_web_server("--max-history-per-job", "5")
    with Client(server.target) as c:
        c.create_job("job-long")
        for i in range(8):
            c.create_execution("job-long", f"node-{i}", compute_reference=f"e{i}", state="ask_for_bid")
        held = list(c.iter_history("job-long"))
    assert [e.version for e in held] == [5, 6, 7, 8, 9]
    page.goto(f"{server.url}#/job/job-long")
    live(page)
    expect(page.locator("#timeline > li")).to_have_count(5)
    # Never shown as the whole story: the page says what came before the first change it holds.
    expect(page.locator("#history-note")).to_have_text("5 changes, oldest first · 4 earlier changes dropped")


def test_restart_goes_reconnecting_then_live_with_nothing_missed(
    make_web_server: Any, page: Any, tmp_path: Path
) -> None:
    # On SQLite the revisions survive the restart, so the page must resume by revision, not relist.
    server = make_web_server("--store", "sqlite", "--data-dir", str(tmp_path / "data"))
    with Client(server.target) as c:
        for i in range(3):
            c.create_job(f"r-{i}")
        head = c.update_job_state("r-0", "queued").revision
    page.goto(server.url)
    live(page)
    expect(page.locator("#conn-text")).to_have_text(f"Live · revision {head}")

    server.stop()
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "reconnecting", timeout=SLOW)
    expect(page.locator("#conn-text")).to_contain_text(f"Reconnecting from revision {head + 1}")
    # Stale data is never shown as live: the banner says what the table is, and the table is dimmed.
    expect(page.locator("#banner")).to_contain_text(f"Not live: showing the jobs as of revision {head}")
    expect(page.locator("#main")).to_have_class(re.compile(r"\bstale\b"))

    server.start()
    with Client(server.target) as c:
        # Written right after the restart, most likely before the page is back: it must catch up on all of it.
        c.update_job_state("r-0", "in_progress")
        c.update_job_state("r-1", "cancelled")
        c.create_execution("r-2", "node-z", compute_reference="z1")
        c.delete_job("r-1")
        c.create_job("r-3")
        last = c.update_job_state("r-0", "completed").revision
    live(page)
    expect(page.locator("#conn-text")).to_have_text(f"Live · revision {last}", timeout=SLOW)
    expect(page.locator("#main")).not_to_have_class(re.compile(r"\bstale\b"))
    expect(page.locator("#banner")).to_be_hidden()
    shows(page, "r-0", version=4, state="COMPLETED")
    shows(page, "r-2", version=2, state="NEW")
    shows(page, "r-3", version=1, state="NEW")
    expect(row(page, "r-1")).to_have_count(0)
    log = page.locator("#conn-log")
    expect(log).to_contain_text(f"reconnecting from revision {head + 1}")
    # Back live at whatever revision it had caught up to when its stream reopened (the writes above may land
    # before or after that); the catch-up then brought it to `last`, with no gap and no relist.
    expect(log).to_contain_text(re.compile(r"live again at revision \d+"))
    expect(log).not_to_contain_text("relist")
    # Each job's versions followed on one by one: nothing was skipped in the catch-up.
    assert page.evaluate("window.jobstate.sync.gaps") == 0


def test_reset_store_is_relisted_not_resumed(make_web_server: Any, page: Any) -> None:
    # An in-memory server restarted at the same address has a new store: resuming by revision would mix two
    # histories. The page sends the store id back, is refused, and relists.
    server = make_web_server()
    with Client(server.target) as c:
        for i in range(4):
            c.create_job(f"old-{i}")
    page.goto(server.url)
    live(page)
    expect(page.locator("#jobs-body tr")).to_have_count(4)
    server.stop()
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=SLOW)
    server.start()
    with Client(server.target) as c:
        c.create_job("new-0")
        head = c.update_job_state("new-0", "queued").revision
    live(page)
    expect(page.locator("#conn-log")).to_contain_text("relisted", timeout=SLOW)
    expect(page.locator("#conn-text")).to_have_text(f"Live · revision {head}", timeout=SLOW)
    expect(page.locator("#jobs-body tr")).to_have_count(1)
    shows(page, "new-0", version=2, state="QUEUED")


def test_token_protected_server_without_a_token_shows_the_error(
    make_web_server: Any, page: Any, tmp_path: Path, screenshot: Any
) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token-0123456789 reader alice\nwriter-token-0123456789 writer bob\n")
    server = make_web_server("--auth-tokens", str(tokens))
    with Client(server.target, token="writer-token-0123456789") as c:
        c.create_job("secret-1")
    page.goto(server.url)
    conn = page.locator("#conn")
    expect(conn).to_have_attribute("data-state", "error", timeout=SLOW)
    expect(page.locator("#conn-text")).to_have_text("UNAUTHENTICATED")
    expect(page.locator("#error-code")).to_contain_text("UNAUTHENTICATED")
    expect(page.locator("#banner")).to_contain_text("this server needs a token")
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#jobs-body tr")).to_have_count(0)
    screenshot(page, "dashboard-token.png")

    page.fill("#token-input", "not-a-token-9999999999")
    page.click("#token-save")
    expect(page.locator("#banner")).to_contain_text("the token in this tab was refused", timeout=SLOW)
    expect(conn).to_have_attribute("data-state", "error")

    page.fill("#token-input", "reader-token-0123456789")
    page.click("#token-save")
    live(page)
    expect(row(page, "secret-1")).to_be_visible()
    # The token stays in this tab's session storage and never reaches the URL.
    assert "reader-token" not in page.url
    assert page.evaluate("sessionStorage.getItem('jobstate.token')") == "reader-token-0123456789"
    assert page.evaluate("localStorage.length") == 0


def test_screenshots_at_desktop_and_phone_width(make_web_server: Any, browser: Any, page: Any, screenshot: Any) -> None:
    server = make_web_server()
    # For the pictures in docs/ (make screenshots) a calmer workload that has run for half a minute; in make test
    # a quick one that has just shown every kind of row.
    for_docs = os.environ.get("JOBSTATE_SCREENSHOTS") == "docs"
    pace = ["--rate", "3", "--speed", "1"] if for_docs else ["--rate", "4", "--speed", "2"]
    workload = ["demo", *pace, "--seed", "7", "--duration", "120"]
    demo = subprocess.Popen(
        [sys.executable, "-m", "jobstate", "--target", server.target, *workload],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    phone = browser.new_context(viewport={"width": 390, "height": 844}, device_scale_factor=1, is_mobile=True)
    try:
        p = phone.new_page()
        for pg in (page, p):
            pg.goto(server.url)
            live(pg)
        # The demo has made its first jobs, bids and failures once a failed execution shows up.
        expect(page.locator("#jobs-body .ec.s-error").first).to_be_visible(timeout=60_000)
        # A picture worth showing: enough finished jobs that the table is not all fresh rows.
        # (A regex, not wait_for_function: the page's CSP forbids the eval that needs.)
        enough = re.compile(r"^([6-9]\d|\d{3,})$" if for_docs else r"^(1[2-9]|[2-9]\d|\d{3,})$")
        expect(page.locator('#counts [data-state="COMPLETED"] .n')).to_have_text(enough, timeout=90_000)
        screenshot(page, "dashboard.png")
        expect(p.locator("#jobs-body tr").first).to_be_visible()
        # Usable at phone width: nothing wider than the screen but the table's own scroller.
        assert p.evaluate("document.documentElement.scrollWidth") <= 390
        screenshot(p, "dashboard-phone.png")

        # A job's page: the finished job with the most executions, its story of bids, failures and retries.
        with Client(server.target) as c:
            finished = list(c.iter_jobs(states=["completed"]))
        job = max(finished, key=lambda j: (len(j.executions), j.job_id))
        page.goto(f"{server.url}#/job/{job.job_id}")
        expect(page.locator("#timeline > li")).to_have_count(job.version)
        # Open the executions that have output: the failures' stderr and the run that published results.
        with_output = [e.compute_reference for e in job.executions if e.HasField("run_output")]
        for ref in with_output:
            page.locator(f'#exec-body tr[data-exec="{ref}"]').click()
        expect(page.locator("#exec-body tr.exec-detail")).to_have_count(len(with_output))
        screenshot(page, "dashboard-job.png", full_page=True)
    finally:
        phone.close()
        demo.terminate()
        demo.wait(10)


def test_compacted_resume_relists(make_web_server: Any, page: Any, tmp_path: Path) -> None:
    # The server holds only the last 3 changes: a page away for more than that cannot resume and must relist.
    server = make_web_server("--store", "sqlite", "--data-dir", str(tmp_path / "data"), "--history-size", "3")
    with Client(server.target) as c:
        c.create_job("c-0")
    page.goto(server.url)
    live(page)
    # The page stays away (its calls fail) until the server has moved on by more than it holds: otherwise it
    # could reconnect right after the restart, before the writes, and resume without needing to relist.
    api = "**/jobstate.v1.JobStateService/**"
    page.route(api, lambda route: route.abort())
    server.stop()
    expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=SLOW)
    server.start()
    with Client(server.target) as c:
        for i in range(1, 9):
            c.create_job(f"c-{i}")
        head = c.update_job_state("c-0", "queued").revision
    page.unroute(api)
    expect(page.locator("#conn-log")).to_contain_text("no longer held", timeout=SLOW)
    expect(page.locator("#conn-log")).to_contain_text("relisted")
    expect(page.locator("#conn-text")).to_have_text(f"Live · revision {head}", timeout=SLOW)
    expect(page.locator("#jobs-body tr")).to_have_count(9)
    shows(page, "c-0", version=2, state="QUEUED")


def test_a_silent_server_is_not_shown_as_live(make_web_server: Any, page: Any) -> None:
    # A frozen server keeps its sockets open: only the missing progress bookmarks tell. The page must stop
    # claiming "live" and say why, then come back when the server does.
    server = make_web_server()
    with Client(server.target) as c:
        c.create_job("s-0")
    page.goto(server.url)
    live(page)
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        expect(page.locator("#conn")).to_have_attribute("data-state", "reconnecting", timeout=SLOW)
        expect(page.locator("#banner")).to_contain_text("no message from the server")
        expect(page.locator("#main")).to_have_class(re.compile(r"\bstale\b"))
    finally:
        server.proc.send_signal(signal.SIGCONT)
    live(page)
    with Client(server.target) as c:
        c.update_job_state("s-0", "queued")
    shows(page, "s-0", version=2, state="QUEUED")


def test_a_revoked_token_ends_live_with_the_servers_error(make_web_server: Any, page: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("reader-token-0123456789 reader alice\nwriter-token-0123456789 writer bob\n")
    server = make_web_server("--auth-tokens", str(tokens))
    with Client(server.target, token="writer-token-0123456789") as c:
        c.create_job("kept-1")
    page.goto(server.url)
    expect(page.locator("#token-form")).to_be_visible(timeout=SLOW)
    page.fill("#token-input", "reader-token-0123456789")
    page.click("#token-save")
    live(page)
    expect(row(page, "kept-1")).to_be_visible()

    # The operator revokes alice's token and reloads: her open watch ends, and the page must say why.
    tokens.write_text("writer-token-0123456789 writer bob\n")
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    expect(page.locator("#conn")).to_have_attribute("data-state", "error", timeout=SLOW)
    expect(page.locator("#conn-text")).to_have_text(re.compile(r"^(UNAUTHENTICATED|PERMISSION_DENIED)"))
    expect(page.locator("#banner")).to_contain_text("the token in this tab was refused")
    expect(page.locator("#banner")).to_contain_text("Not live: showing the jobs as of revision")
    expect(page.locator("#main")).to_have_class(re.compile(r"\bstale\b"))

def test_smoke(harness):
    harness.start()
    body = harness.echo_json("/x")
    assert body["path"] == "/x"

async def test_sort_completes(connect, make_group):
    group, songs = await make_group(["u1"], songs=10)
    a = await connect("u1")
    joined = await a.request("join", group=group)
    assert joined["type"] == "joined"
    acc = await a.request("sort", group=group)
    assert acc["type"] == "sort.accepted"
    done = await a.until(lambda f: f["type"] in ("job.completed", "job.failed"))
    assert done["type"] == "job.completed", done
    assert sorted(done["job"]["result"]["order"]) == sorted(songs)

"""The tests' own redis-server helper: starts on a free port, survives a restart."""

from tests.redis_proc import RedisServer


def test_redis_server_starts_restarts_and_keeps_aof_data():
    server = RedisServer(aof=True, password="s3cret").start()
    try:
        client = server.client()
        client.set("k", "v")
        client.execute_command("BGREWRITEAOF")
        import time

        time.sleep(1.2)  # appendfsync everysec
        server.restart()
        assert server.client().get("k") == b"v"
    finally:
        server.close()

# The lazy bench's SQLite workload (sqlite.rs runs it with the system Python).
#   build DB MB      a deterministic database of at least MB megabytes: one table, two indexes
#   query DB N SEED  N indexed queries picked by SEED; prints "seconds cpu-seconds checksum rows"
import random
import sqlite3
import sys
import time
import zlib

ROW_PAYLOAD = 180


def build(path, mb):
    rng = random.Random(7)
    db = sqlite3.connect(path)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute(
        "CREATE TABLE item (id INTEGER PRIMARY KEY, k INTEGER NOT NULL, "
        "name TEXT NOT NULL, payload BLOB NOT NULL)"
    )
    rows = mb * 1_000_000 // (ROW_PAYLOAD + 60)
    batch = []
    for i in range(rows):
        k = rng.randrange(1 << 40)
        name = "%016x" % rng.randrange(1 << 64)
        batch.append((i, k, name, rng.randbytes(ROW_PAYLOAD)))
        if len(batch) == 50_000:
            db.executemany("INSERT INTO item VALUES (?, ?, ?, ?)", batch)
            batch.clear()
    db.executemany("INSERT INTO item VALUES (?, ?, ?, ?)", batch)
    db.execute("CREATE INDEX item_k ON item (k)")
    db.execute("CREATE INDEX item_name ON item (name)")
    db.commit()
    db.execute("VACUUM")
    db.close()
    print(rows)


def query(path, n, seed):
    db = sqlite3.connect("file:%s?mode=ro" % path, uri=True)
    rows = db.execute("SELECT max(id) FROM item").fetchone()[0] + 1
    rng = random.Random(seed)
    # The same rows the build made, so that lookups by k and name find something.
    gen = random.Random(7)
    keys = []
    for i in range(rows):
        k = gen.randrange(1 << 40)
        name = "%016x" % gen.randrange(1 << 64)
        gen.randbytes(ROW_PAYLOAD)
        keys.append((k, name))
    picks = [rng.randrange(rows) for _ in range(n)]
    checksum = 0
    found = 0
    t = time.perf_counter()
    cpu = time.process_time()
    for i, row in enumerate(picks):
        k, name = keys[row]
        kind = i % 4
        if kind == 0:  # point lookup through the k index
            r = db.execute("SELECT id, length(payload) FROM item WHERE k = ?", (k,)).fetchall()
        elif kind == 1:  # point lookup through the name index
            r = db.execute("SELECT id, k FROM item WHERE name = ?", (name,)).fetchall()
        elif kind == 2:  # rowid lookup
            r = db.execute("SELECT k, substr(payload, 1, 8) FROM item WHERE id = ?", (row,)).fetchall()
        else:  # a short range of the name index, with the rows it names
            r = db.execute(
                "SELECT count(*), sum(length(payload)) FROM "
                "(SELECT payload FROM item WHERE name >= ? ORDER BY name LIMIT 20)",
                (name,),
            ).fetchall()
        found += len(r)
        checksum = zlib.crc32(repr(r).encode(), checksum)
    secs = time.perf_counter() - t
    cpu = time.process_time() - cpu
    db.close()
    print("%.6f %.6f %d %d" % (secs, cpu, checksum, found))


if __name__ == "__main__":
    if sys.argv[1] == "build":
        build(sys.argv[2], int(sys.argv[3]))
    else:
        query(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))

"""MapReduce word count (spec 6.13): 'mapper' jobs count words of documents sent to the
nodes with 'depends'; 'reducer' jobs merge partial counts; the client merges and prints.

Run:  python examples/local_cluster.py examples/mapreduce.py
(the 5 documents are generated in a temporary folder)
"""

# a version of word frequency example from mapreduce tutorial

def mapper(doc):
    # input reader and map function are combined; 'doc' was sent with
    # 'depends', so it is in the job's working directory
    words = []
    with open(doc) as fd:
        for line in fd:
            words.extend((word.lower(), 1) for word in line.split() \
                         if len(word) > 3 and word.isalpha())
    return words

def reducer(words):
    # we should generate sorted lists which are then merged,
    # but to keep things simple, we use dicts
    word_count = {}
    for word, count in words:
        if word not in word_count:
            word_count[word] = 0
        word_count[word] += count
    # print('reducer: %s to %s' % (len(words), len(word_count)))
    return word_count

def make_docs(folder, n=5):
    # generate n small documents from a fixed vocabulary
    import os, random
    vocabulary = ('dispy distributes python functions over nodes and the nodes '
                  'execute jobs with their arguments then send results back to '
                  'client which processes them Cluster Node Job map reduce').split()
    rng = random.Random(2016)
    docs = []
    for i in range(1, n + 1):
        path = os.path.join(folder, 'doc%s' % i)
        with open(path, 'w') as fd:
            for line in range(40):
                fd.write(' '.join(rng.choice(vocabulary) for _ in range(12)) + '\n')
        docs.append(path)
    return docs

if __name__ == '__main__':
    import dispy, os, shutil, sys, tempfile
    tmp = tempfile.mkdtemp(prefix='mapreduce-')
    docs = make_docs(tmp)
    # the documents are transferred to the nodes with 'depends', so nodes
    # need no local copies; nodes are found with default discovery
    # (nodes=['*']) for both clusters
    map_cluster = dispy.JobCluster(mapper, depends=docs, reentrant=True)
    # any node can work on reduce
    reduce_cluster = dispy.JobCluster(reducer, reentrant=True)
    map_jobs = []
    for f in docs:
        job = map_cluster.submit(os.path.basename(f))
        job.id = os.path.basename(f)
        map_jobs.append(job)
    failed = 0
    reduce_jobs = []
    for map_job in map_jobs:
        words = map_job()
        if not words:
            print('map job %s failed: %s' % (map_job.id, map_job.exception))
            failed += 1
            continue
        # simple partition
        n = 0
        while n < len(words):
            m = min(len(words) - n, 1000)
            reduce_job = reduce_cluster.submit(words[n:n+m])
            reduce_jobs.append(reduce_job)
            n += m
    # reduce
    word_count = {}
    for reduce_job in reduce_jobs:
        words = reduce_job()
        if not words:
            print('reduce job failed: %s' % reduce_job.exception)
            failed += 1
            continue
        for word, count in words.items():
            if word not in word_count:
                word_count[word] = 0
            word_count[word] += count
    # sort words by frequency and print
    for word in sorted(word_count, key=lambda x: word_count[x], reverse=True):
        count = word_count[word]
        print(word, count)
    map_cluster.close()
    reduce_cluster.close()
    # check against the same computation done locally
    expected = reducer([wc for doc in docs for wc in mapper(doc)])
    shutil.rmtree(tmp, ignore_errors=True)
    if word_count != expected:
        print('word counts differ from the local computation')
        failed += 1
    sys.exit(1 if failed else 0)

/* Error paths of src/flux2/attention/cudnn_sdpa.cpp against the real cuDNN 9 libraries, on a
 * machine without a GPU (scripts/check-cudnn-shim.sh builds and runs it; not part of make test,
 * which has no cuDNN). Each call must come back with a code and a message, never abort:
 *   argv[1]: cuDNN's loader alone (its sub-libraries absent), argv[2]: the complete cuDNN. */
#include <stdint.h>
#include <stdio.h>
#include <string.h>

int imagegen_cudnn_sdpa_open(const char *, int64_t *, char *, size_t);
int imagegen_cudnn_sdpa_prepare(int, int, int64_t, int64_t, int64_t, int64_t, int, int64_t *, char *, size_t);

static int failures = 0;

static void expect(const char *what, int rc, int want_rc, const char *err, const char *want_text) {
    int ok = rc == want_rc && (want_text == NULL || strstr(err, want_text) != NULL);
    printf("%s %s: rc=%d %s\n", ok ? "ok  " : "FAIL", what, rc, rc ? err : "");
    failures += !ok;
}

int main(int argc, char **argv) {
    char err[2048];
    int64_t version = 0, workspace = 0;
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc != 3) {
        fprintf(stderr, "usage: %s <libcudnn.so.9 alone> <libcudnn.so.9 of a full install>\n", argv[0]);
        return 2;
    }
    int rc = imagegen_cudnn_sdpa_prepare(0, 0, 1, 24, 4608, 128, 0, &workspace, err, sizeof err);
    expect("prepare before open", rc, 1, err, "not open");
    rc = imagegen_cudnn_sdpa_open("libcudnn-absent.so.9", &version, err, sizeof err);
    expect("open a missing library", rc, 1, err, "cannot open shared object");
    rc = imagegen_cudnn_sdpa_open(argv[1], &version, err, sizeof err);
    expect("open a loader without its sub-libraries", rc, 1, err, "libcudnn_graph.so.9");
    rc = imagegen_cudnn_sdpa_open(argv[2], &version, err, sizeof err);
    expect("open the full cuDNN", rc, 0, err, NULL);
    printf("     cuDNN version %lld\n", (long long)version);
    failures += version < 90000;
    rc = imagegen_cudnn_sdpa_prepare(0, 0, 1, 24, 4608, 128, 0, &workspace, err, sizeof err);
    expect("prepare without a GPU", rc, 1, err, "cudnnCreate");
    return failures ? 1 : 0;
}

/*
 * fcvm-gate: the container's first process, holding the container at a gate until
 * the guest agent says what to run in it.
 *
 * Why: under emulation `podman run` costs seconds, and everything it does before
 * the user's process starts (storage, namespaces, cgroups, mounts) is the same for
 * every run of an image. So the agent starts the container with this program as its
 * entrypoint, fcvm can snapshot the VM right there, and each run (booted or restored)
 * only tells the gate the command, environment and stdio, and the gate execs it: the
 * user's process is the container's PID 1 exactly as if podman had started it.
 *
 * Protocol, on the Unix stream socket $FCVM_GATE_SOCKET (default /.fcvm/gate.sock,
 * a directory the agent bind-mounts read-only into the container):
 *   gate -> agent  "GATE1\n"                      (the agent reads our pid with SO_PEERCRED)
 *   agent -> gate  one message: a 24-byte header of u32 in host order
 *                  {magic 'FCVG', version 1, flags (1: TTY), argc, envc, payload bytes},
 *                  with exactly 3 descriptors as SCM_RIGHTS (stdin, stdout, stderr; with
 *                  a TTY the terminal's slave three times), then the payload: argc
 *                  NUL-terminated arguments followed by envc "KEY=VALUE" strings, which
 *                  are set on top of the environment podman gave us.
 *   gate           with a TTY: a session of its own (crun has made one already: setsid()
 *                  only if not) with the terminal as its controlling one; dup2 the
 *                  three onto 0, 1, 2; execvp(argv[0]). The socket is close-on-exec,
 *                  so success is end-of-file for the agent.
 *   gate -> agent  on failure only: "E<errno>\n", then exit 127 (not found) or 126.
 *
 * Static (no libc of the image is needed), small, and stdin/stdout untouched until the
 * message arrives. Built by `fcvm setup` with the host's gcc (assets/gate.py).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <termios.h>
#include <unistd.h>

#define MAGIC 0x47564346u /* "FCVG" */
#define VERSION 1u
#define FLAG_TTY 1u
#define MAX_PAYLOAD (4u << 20)
#define MAX_ITEMS 65536u

struct header {
    uint32_t magic, version, flags, argc, envc, size;
};

static void die(const char *what) {
    /* Nothing sensible to report to: our stdio is podman's log until the message. */
    fprintf(stderr, "fcvm-gate: %s: %s\n", what, strerror(errno));
    _exit(125);
}

static int read_full(int fd, void *buf, size_t len) {
    char *p = buf;
    while (len) {
        ssize_t n = read(fd, p, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        p += n;
        len -= (size_t)n;
    }
    return 0;
}

static int connect_agent(void) {
    const char *path = getenv("FCVM_GATE_SOCKET");
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (!path)
        path = "/.fcvm/gate.sock";
    if (strlen(path) >= sizeof(addr.sun_path)) {
        errno = ENAMETOOLONG;
        die(path);
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket");
    while (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        if (errno != EINTR)
            die(path);
    }
    if (write(fd, "GATE1\n", 6) != 6)
        die("hello");
    return fd;
}

/* The header and its three descriptors, in one recvmsg. */
static void receive_header(int sock, struct header *h, int fds[3]) {
    char control[CMSG_SPACE(3 * sizeof(int))];
    struct iovec iov = {.iov_base = h, .iov_len = sizeof(*h)};
    struct msghdr msg = {
        .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control,
        .msg_controllen = sizeof(control),
    };
    ssize_t n;
    do
        n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    while (n < 0 && errno == EINTR);
    if (n != (ssize_t)sizeof(*h)) {
        errno = n < 0 ? errno : EPROTO;
        die("no start message");
    }
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    if (!c || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS ||
        c->cmsg_len != CMSG_LEN(3 * sizeof(int)) || (msg.msg_flags & MSG_CTRUNC)) {
        errno = EPROTO;
        die("start message without its 3 descriptors");
    }
    memcpy(fds, CMSG_DATA(c), 3 * sizeof(int));
    if (h->magic != MAGIC || h->version != VERSION || h->size > MAX_PAYLOAD ||
        h->argc == 0 || h->argc > MAX_ITEMS || h->envc > MAX_ITEMS) {
        errno = EPROTO;
        die("bad start message");
    }
}

/* Split the payload into argc + envc NUL-terminated strings; -1 if it does not. */
static int split(char *payload, uint32_t size, char **items, uint32_t count) {
    uint32_t at = 0;
    for (uint32_t i = 0; i < count; i++) {
        char *end = memchr(payload + at, '\0', size - at);
        if (!end)
            return -1;
        items[i] = payload + at;
        at = (uint32_t)(end - payload) + 1;
    }
    items[count] = NULL;
    return at == size ? 0 : -1;
}

static void report(int sock, int err) {
    char line[32];
    int len = snprintf(line, sizeof(line), "E%d\n", err);
    if (write(sock, line, (size_t)len) < 0) { /* the agent is gone: nothing to do */
    }
    _exit(err == ENOENT ? 127 : 126);
}

int main(void) {
    int sock = connect_agent();
    struct header h;
    int fds[3];
    receive_header(sock, &h, fds);
    char *payload = malloc(h.size + 1);
    char **items = calloc((size_t)h.argc + h.envc + 1, sizeof(char *));
    char **argv = calloc((size_t)h.argc + 1, sizeof(char *));
    if (!payload || !items || !argv)
        die("malloc");
    if (read_full(sock, payload, h.size) < 0)
        die("start message truncated");
    if (split(payload, h.size, items, h.argc + h.envc) < 0) {
        errno = EPROTO;
        die("start message payload");
    }
    memcpy(argv, items, h.argc * sizeof(char *)); /* argv[argc] stays NULL */
    for (uint32_t i = 0; i < h.envc; i++) {
        /* (the strings stay valid: the payload is never freed) */
        if (putenv(items[h.argc + i]) != 0)
            report(sock, errno);
    }
    if (h.flags & FLAG_TTY) {
        /* (crun starts every container process as a session leader; setsid() would
         * then fail with EPERM, and is only needed where it did not) */
        if (getsid(0) != getpid() && setsid() < 0)
            report(sock, errno);
        if (ioctl(fds[0], TIOCSCTTY, 0) < 0)
            report(sock, errno);
    }
    for (int i = 0; i < 3; i++) {
        if (dup2(fds[i], i) < 0)
            report(sock, errno);
    }
    for (int i = 0; i < 3; i++) {
        if (fds[i] > 2)
            close(fds[i]); /* (the same one twice, with a TTY: EBADF, harmless) */
    }
    execvp(argv[0], argv);
    report(sock, errno);
}

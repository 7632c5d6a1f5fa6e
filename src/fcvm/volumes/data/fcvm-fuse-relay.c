/*
 * fcvm-fuse-relay: the guest half of an fcvm --map volume.
 *
 *   fcvm-fuse-relay [--ro] [--mntns PATH] MOUNTPOINT STREAM_FD
 *
 * Opens /dev/fuse; with --mntns, enters the mount namespace PATH names (a container's
 * /proc/PID/ns/mnt: /dev/fuse is opened first, in ours, since a container need not
 * have it) and creates MOUNTPOINT there (mkdir -p, mode 0755); then mounts a FUSE filesystem (type fuse.fcvm, source "fcvm",
 * nosuid,nodev[,ro], default_permissions,allow_other) on MOUNTPOINT, then writes
 * one byte, 'R', to stdout and closes it: the mount exists from that moment (requests
 * wait until the host answers INIT). On a setup failure it prints one line on stderr
 * and exits 1 without writing the byte (exit 2: bad usage).
 *
 * Then it relays raw FUSE messages between /dev/fuse and STREAM_FD, an already
 * connected byte stream to the host's server (virtio-serial port, vsock socket, or a
 * socketpair in tests):
 *   kernel -> host: each read(2) of /dev/fuse yields one whole request; it is written
 *                   to the stream in full (partial writes continued).
 *   host -> kernel: replies are framed by their first u32 (fuse_out_header.len); each
 *                   complete reply goes to /dev/fuse in one write(2).
 * One thread per direction; no copies beyond the kernel's. It exits 0 (after a lazy
 * unmount, MNT_DETACH) when the stream ends, when the mount goes away (ENODEV), or on
 * SIGTERM/SIGINT/SIGHUP; exit 3 on an I/O error or a malformed reply frame.
 *
 * Readahead: once the kernel has taken the reply to INIT (always the first reply), the
 * mount's readahead window is raised to READAHEAD_KB through its bdi's read_ahead_kb in
 * sysfs (the directory is opened before entering --mntns). The kernel offers INIT its
 * 128 KiB default and only ever lowers it from the reply; over a virtio-serial port
 * under emulation a sequential read with 128 KiB in flight is mostly round trips, with
 * four 1 MiB READs in flight it runs about twice as fast. Best effort: on any failure
 * the default stays.
 *
 * Static build: gcc -static -O2 -Wall -Wextra -pthread -o fcvm-fuse-relay this.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#define HEADER_OUT 16
/* A request is at most max_write (1 MiB, FUSE_MAX_MAX_PAGES pages) plus its headers;
 * the kernel wants the read buffer to hold that. Replies are at most 1 MiB of READ
 * data plus the header. */
#define MAX_MSG (1024 * 1024 + 4096)
#define STREAM_CHUNK (32 * 1024) /* virtio-serial takes at most this per write */
#define READAHEAD_KB "4096"         /* four 1 MiB READs in flight on a sequential read */

static const char *mountpoint;
static int fuse_fd = -1, stream_fd = -1;
static int bdi_dir = -1; /* /sys/class/bdi, for the readahead window */

/* The mount's bdi is "MAJOR:MINOR" of its st_dev. statx with AT_STATX_DONT_SYNC and an
 * empty mask answers from the superblock without a request to the host (this runs on
 * the thread that delivers replies, so a request would never be answered). */
static void raise_readahead(void)
{
    struct statx stx;
    char name[64];
    if (bdi_dir < 0)
        return;
    if (statx(AT_FDCWD, mountpoint, AT_STATX_DONT_SYNC | AT_SYMLINK_NOFOLLOW, 0, &stx) == 0) {
        snprintf(name, sizeof name, "%u:%u/read_ahead_kb", stx.stx_dev_major,
                 stx.stx_dev_minor);
        int fd = openat(bdi_dir, name, O_WRONLY | O_CLOEXEC);
        if (fd >= 0) {
            if (write(fd, READAHEAD_KB, strlen(READAHEAD_KB)) < 0) {
                /* best effort */
            }
            close(fd);
        }
    }
    close(bdi_dir);
    bdi_dir = -1;
}

static void finish(int code)
{
    /* Lazy: processes still inside see ENOTCONN once our /dev/fuse fd closes. */
    umount2(mountpoint, MNT_DETACH);
    _exit(code);
}

static void on_signal(int sig)
{
    (void)sig;
    finish(0);
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n > 0) {
        ssize_t w = write(fd, p, n < STREAM_CHUNK ? n : STREAM_CHUNK);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* kernel -> host */
static void *requests(void *arg)
{
    char *buf = arg;
    for (;;) {
        ssize_t n = read(fuse_fd, buf, MAX_MSG);
        if (n < 0) {
            /* ENOENT: the request was interrupted before we read it; retry. */
            if (errno == EINTR || errno == EAGAIN || errno == ENOENT)
                continue;
            if (errno == ENODEV) /* unmounted: the connection is gone */
                finish(0);
            perror("fcvm-fuse-relay: read /dev/fuse");
            finish(3);
        }
        if (write_all(stream_fd, buf, (size_t)n) < 0) {
            if (errno == EPIPE || errno == ECONNRESET)
                finish(0);
            perror("fcvm-fuse-relay: write stream");
            finish(3);
        }
    }
    return NULL;
}

/* host -> kernel */
static void replies(char *buf)
{
    size_t have = 0;
    for (;;) {
        ssize_t n = read(stream_fd, buf + have, MAX_MSG - have);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            if (errno == ECONNRESET)
                finish(0);
            perror("fcvm-fuse-relay: read stream");
            finish(3);
        }
        if (n == 0)
            finish(0); /* the host closed the mapping */
        have += (size_t)n;
        size_t off = 0;
        while (have - off >= HEADER_OUT) {
            uint32_t len;
            memcpy(&len, buf + off, sizeof len);
            if (len < HEADER_OUT || len > MAX_MSG) {
                fprintf(stderr, "fcvm-fuse-relay: bad reply length %u\n", len);
                finish(3);
            }
            if (have - off < len)
                break;
            if (write(fuse_fd, buf + off, len) < 0) {
                /* ENOENT: the request was aborted or interrupted meanwhile. */
                if (errno == ENODEV)
                    finish(0);
                if (errno != ENOENT) {
                    perror("fcvm-fuse-relay: write /dev/fuse");
                    finish(3);
                }
            }
            if (bdi_dir >= 0) /* that was the INIT reply: the kernel has applied it */
                raise_readahead();
            off += len;
        }
        if (off > 0) { /* keep the partial reply (less than one message) at the front */
            memmove(buf, buf + off, have - off);
            have -= off;
        }
    }
}

/* mkdir -p, each component made 0755 if missing; 0 or -1 with errno. */
static int make_dirs(const char *path)
{
    char buf[4096];
    if (strlen(path) >= sizeof buf) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(buf, path);
    for (char *p = buf + 1;; p++) {
        if (*p == '/' || *p == '\0') {
            char c = *p;
            *p = '\0';
            if (mkdir(buf, 0755) < 0 && errno != EEXIST)
                return -1;
            *p = c;
            if (c == '\0')
                return 0;
        }
    }
}

static int usage(void)
{
    fprintf(stderr, "usage: fcvm-fuse-relay [--ro] [--mntns PATH] MOUNTPOINT STREAM_FD\n");
    return 2;
}

int main(int argc, char **argv)
{
    int ro = 0, argi = 1;
    const char *mntns = NULL;
    while (argi < argc && strncmp(argv[argi], "--", 2) == 0) {
        if (strcmp(argv[argi], "--ro") == 0) {
            ro = 1;
            argi++;
        } else if (strcmp(argv[argi], "--mntns") == 0 && argi + 1 < argc) {
            mntns = argv[argi + 1];
            argi += 2;
        } else {
            return usage();
        }
    }
    if (argc - argi != 2)
        return usage();
    mountpoint = argv[argi];
    char *end;
    long sfd = strtol(argv[argi + 1], &end, 10);
    if (*end || end == argv[argi + 1] || sfd < 0 || sfd > 1 << 20 ||
        fcntl((int)sfd, F_GETFD) < 0) {
        fprintf(stderr, "fcvm-fuse-relay: STREAM_FD %s is not an open descriptor\n",
                argv[argi + 1]);
        return 2;
    }
    stream_fd = (int)sfd;
    /* Blocking I/O on the stream, whatever the opener left set. */
    fcntl(stream_fd, F_SETFL, fcntl(stream_fd, F_GETFL) & ~O_NONBLOCK);

    char *rbuf = malloc(MAX_MSG), *wbuf = malloc(MAX_MSG);
    if (!rbuf || !wbuf) {
        fprintf(stderr, "fcvm-fuse-relay: out of memory\n");
        return 1;
    }
    fuse_fd = open("/dev/fuse", O_RDWR | O_CLOEXEC);
    if (fuse_fd < 0) {
        perror("fcvm-fuse-relay: open /dev/fuse");
        return 1;
    }
    /* Before --mntns: a container's /sys is read-only (or absent). */
    bdi_dir = open("/sys/class/bdi", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (mntns) {
        int ns = open(mntns, O_RDONLY | O_CLOEXEC);
        if (ns < 0 || setns(ns, CLONE_NEWNS) < 0) {
            fprintf(stderr, "fcvm-fuse-relay: enter %s: %s\n", mntns, strerror(errno));
            return 1;
        }
        close(ns);
        if (make_dirs(mountpoint) < 0) {
            fprintf(stderr, "fcvm-fuse-relay: mkdir %s: %s\n", mountpoint, strerror(errno));
            return 1;
        }
    }
    char opts[160];
    snprintf(opts, sizeof opts,
             "fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other,default_permissions",
             fuse_fd);
    unsigned long flags = MS_NOSUID | MS_NODEV | (ro ? MS_RDONLY : 0);
    if (mount("fcvm", mountpoint, "fuse.fcvm", flags, opts) < 0) {
        fprintf(stderr, "fcvm-fuse-relay: mount %s: %s\n", mountpoint, strerror(errno));
        return 1;
    }

    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sigaction(SIGHUP, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);

    pthread_t t;
    if (pthread_create(&t, NULL, requests, rbuf) != 0) {
        fprintf(stderr, "fcvm-fuse-relay: cannot start a thread\n");
        finish(1);
    }
    if (write(STDOUT_FILENO, "R", 1) != 1) {
        /* nobody waits for readiness: carry on */
    }
    close(STDOUT_FILENO);
    replies(wbuf);
    return 0;
}

//! Booting Linux, up to loading: this host (kvm-pvm) cannot run a stock kernel, so the test reads
//! back from guest memory, through QMP `pmemsave`, what a kernel would find there — the zero
//! page's setup header, the command line with the virtio devices on it, the initrd where the
//! header says, the e820 map — with the vCPUs never started (`-S`).

mod common;

use std::path::Path;

use common::*;
use serde_json::json;

/// A bzImage as far as a loader can tell: the setup header of boot protocol 2.15, then the
/// protected-mode part.
fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
    let setup_sects = 4u8;
    let mut img = vec![0u8; (setup_sects as usize + 1) * 512];
    img[0x1f1] = setup_sects;
    img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
    img[0x202..0x206].copy_from_slice(b"HdrS");
    img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
    img[0x211] = 0x01; // LOADED_HIGH
    img[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
    img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
    img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
    img[0x260..0x264].copy_from_slice(&(16u32 << 20).to_le_bytes()); // init_size
    img.extend_from_slice(payload);
    img
}

fn read_guest(q: &mut Qmp, d: &Path, addr: u64, size: u64) -> Vec<u8> {
    let f = d.join(format!("mem-{addr:x}"));
    q.ok(
        "pmemsave",
        json!({"val": addr, "size": size, "filename": f.to_str().unwrap()}),
    );
    std::fs::read(&f).unwrap()
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
}

#[test]
fn a_bzimage_its_initrd_command_line_and_disks_are_where_linux_looks() {
    let d = tmpdir("linux-boot");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 + 3) as u8).collect();
    let initrd: Vec<u8> = (0..500_000u32).map(|i| (i * 13 + 1) as u8).collect();
    let (k, rd, disk) = (d.join("bzImage"), d.join("initrd"), d.join("disk.img"));
    std::fs::write(&k, fake_bzimage(&payload)).unwrap();
    std::fs::write(&rd, &initrd).unwrap();
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let sock = d.join("qmp");
    let p = Proc::tern_run(&[
        "-S",
        "--memory",
        "512M",
        "--kernel",
        k.to_str().unwrap(),
        "--initrd",
        rd.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--cmdline",
        "console=ttyS0 root=/dev/vda",
        "--qmp",
        &format!("unix:{}", sock.display()),
    ]);
    let mut v = Vmm {
        p,
        q: Qmp::connect(&sock, LINE),
    };
    assert_eq!(
        v.q.ok("query-status", json!({})),
        json!({"running": false, "status": "paused"})
    );
    let zp = read_guest(&mut v.q, &d, 0x7000, 4096);
    assert_eq!(&zp[0x202..0x206], b"HdrS");
    assert_eq!(zp[0x210], 0xff, "type_of_loader");
    // The protected-mode kernel at 1 MiB.
    assert_eq!(
        read_guest(&mut v.q, &d, 0x10_0000, payload.len() as u64),
        payload
    );
    // The command line, with the disk announced as Linux's virtio-mmio driver expects.
    let cmd = read_guest(&mut v.q, &d, u64::from(u32_at(&zp, 0x228)), 256);
    let cmd =
        String::from_utf8_lossy(&cmd[..cmd.iter().position(|&b| b == 0).unwrap()]).to_string();
    assert_eq!(
        cmd,
        "console=ttyS0 root=/dev/vda virtio_mmio.device=512@0xfeb00000:5"
    );
    // The initrd where ramdisk_image/ramdisk_size say, page-aligned, below the 32-bit hole.
    let (at, size) = (u64::from(u32_at(&zp, 0x218)), u64::from(u32_at(&zp, 0x21c)));
    assert_eq!(size, initrd.len() as u64);
    assert!(
        at % 4096 == 0 && at >= 0x10_0000 + (16 << 20) && at + size <= 512 << 20,
        "{at:#x}"
    );
    assert_eq!(read_guest(&mut v.q, &d, at, size), initrd);
    // The e820 map: low RAM, the reserved EBDA/BIOS area, RAM from 1 MiB to 512 MiB.
    let n = zp[0x1e8] as usize;
    let e820: Vec<(u64, u64, u32)> = (0..n)
        .map(|i| {
            let e = &zp[0x2d0 + 20 * i..0x2d0 + 20 * (i + 1)];
            (
                u64::from_le_bytes(e[0..8].try_into().unwrap()),
                u64::from_le_bytes(e[8..16].try_into().unwrap()),
                u32_at(e, 16),
            )
        })
        .collect();
    assert!(
        e820.iter()
            .any(|&(a, s, t)| t == 1 && a <= 0x10_0000 && a + s == 512 << 20),
        "{e820:x?}"
    );
    quit(v);
}

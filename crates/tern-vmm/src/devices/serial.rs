//! The 16550 UART at 0x3f8 (vm-superio's, raising IRQ 4 through an irqfd) as a device-manager
//! entry, and the power-off latch at 0x604.

use std::sync::Mutex;

use tern_wire::{
    FieldSpec, FieldType, Schema, Section, SectionBuilder, SectionReader, StateError, Value,
};
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use super::{bytes_field, DeviceState, LoadCtx, PioOutcome, PortIo};
use crate::serial::{IrqTrigger, SerialDevice, SerialSink};
use crate::vm::Vm;

const fn u8_field(name: &'static str) -> FieldSpec {
    FieldSpec {
        name,
        ty: FieldType::U8,
        since: 1,
    }
}

static SERIAL: Schema = Schema {
    name: "serial-16550",
    version: 1,
    min_version: 1,
    fields: &[
        u8_field("dll"),
        u8_field("dlh"),
        u8_field("ier"),
        u8_field("iir"),
        u8_field("lcr"),
        u8_field("lsr"),
        u8_field("mcr"),
        u8_field("msr"),
        u8_field("scr"),
        bytes_field("rx_fifo"),
    ],
    subsections: &[],
};

/// COM1.
pub struct SerialPort {
    uart: Mutex<SerialDevice>,
    /// The irqfd, for the UART a load rebuilds.
    irq: EventFd,
}

impl SerialPort {
    pub(crate) fn new(uart: SerialDevice, irq: EventFd) -> Self {
        SerialPort {
            uart: Mutex::new(uart),
            irq,
        }
    }

    fn uart(&self) -> std::sync::MutexGuard<'_, SerialDevice> {
        self.uart.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl PortIo for SerialPort {
    fn write(&self, offset: u16, data: &[u8]) -> PioOutcome {
        if let [b] = data {
            if let Err(e) = self.uart().write(offset as u8, *b) {
                tracing::warn!("serial write: {e:?}");
            }
        }
        PioOutcome::Done
    }

    fn read(&self, offset: u16, data: &mut [u8]) {
        match data {
            [b] => *b = self.uart().read(offset as u8),
            _ => data.fill(0xff),
        }
    }

    /// The console holds a partial line until its newline; out with it now, or a migration
    /// would lose those bytes (the line buffer is the VMM's, not the guest's state).
    fn quiesce(&self) {
        let _ = std::io::Write::flush(self.uart().writer_mut());
    }
}

impl DeviceState for SerialPort {
    fn schema(&self) -> &'static Schema {
        &SERIAL
    }
    fn instance(&self) -> u32 {
        0
    }
    fn save(&self, _vm: &Vm) -> Result<Section, StateError> {
        let s = self.uart().state();
        SectionBuilder::new(&SERIAL, 0)
            .field("dll", Value::U8(s.baud_divisor_low))?
            .field("dlh", Value::U8(s.baud_divisor_high))?
            .field("ier", Value::U8(s.interrupt_enable))?
            .field("iir", Value::U8(s.interrupt_identification))?
            .field("lcr", Value::U8(s.line_control))?
            .field("lsr", Value::U8(s.line_status))?
            .field("mcr", Value::U8(s.modem_control))?
            .field("msr", Value::U8(s.modem_status))?
            .field("scr", Value::U8(s.scratch))?
            .field("rx_fifo", Value::Bytes(s.in_buffer.clone()))?
            .build()
    }

    fn load(&self, _vm: &Vm, section: &Section, _: &LoadCtx) -> Result<(), StateError> {
        let r = SectionReader::new(&SERIAL, section)?;
        let invalid = |reason: String| StateError::Invalid {
            section: SERIAL.name.into(),
            reason,
        };
        let b = |n: &str| -> Result<u8, StateError> {
            match r.value(n)? {
                Value::U8(v) => Ok(*v),
                _ => Err(invalid(n.into())),
            }
        };
        let state = SerialState {
            baud_divisor_low: b("dll")?,
            baud_divisor_high: b("dlh")?,
            interrupt_enable: b("ier")?,
            interrupt_identification: b("iir")?,
            line_control: b("lcr")?,
            line_status: b("lsr")?,
            modem_control: b("mcr")?,
            modem_status: b("msr")?,
            scratch: b("scr")?,
            in_buffer: r.bytes("rx_fifo")?.to_vec(),
        };
        let irq = self.irq.try_clone().map_err(|e| invalid(e.to_string()))?;
        let mut uart = self.uart();
        let out = std::mem::replace(uart.writer_mut(), SerialSink::null());
        // vm-superio validates the state (FIFO size) and re-raises a pending interrupt.
        *uart =
            SerialDevice::from_state(&state, IrqTrigger(irq), vm_superio::serial::NoEvents, out)
                .map_err(|e| invalid(format!("{e:?}")))?;
        Ok(())
    }
}

/// The power-off latch (QEMU q35's ACPI PM1a control): the built-in guest writes SLP_EN here.
pub struct ShutdownPort;

const SLP_EN: u16 = 0x2000;

impl PortIo for ShutdownPort {
    fn write(&self, _offset: u16, data: &[u8]) -> PioOutcome {
        match data {
            [lo, hi] if u16::from_le_bytes([*lo, *hi]) & SLP_EN != 0 => PioOutcome::Shutdown,
            _ => PioOutcome::Done,
        }
    }
    fn read(&self, _offset: u16, data: &mut [u8]) {
        data.fill(0);
    }
    fn quiesce(&self) {}
}
